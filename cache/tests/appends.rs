//! Format 2: a flush appends to the segment being filled instead of sealing it, so a
//! sync-heavy writer fills the cache at the rate of its data; appended lines survive a
//! kill; a line rewritten after an append takes a new line and the newest copy wins;
//! a format-1 cache still opens, serves and writes back; the cleaner moves the lines of a
//! segment recovery took at an older append (its final header damaged).

mod common;

use std::sync::Arc;

use common::*;
use lc_cache::format::{newest_header, Geometry, SegmentHeader, Superblock, SB_COPY_SIZE};
use lc_cache::{BlockDevice, Cache, MemDevice, OpenOptions, Tunables};

const SEG: u32 = 64 << 10;
const BACKING: u64 = 4 << 20;

fn block(serial: u64, b: u64) -> Vec<u8> {
    tagged_block(serial, b)
}

fn serial_of(c: &Cache, b: u64) -> Option<u64> {
    let mut buf = vec![0u8; 4096];
    c.read(0, b * 4096, &mut buf).unwrap();
    let first = decode_sector(0, b * 8, &buf[..512]);
    for s in 1..8u64 {
        assert_eq!(
            decode_sector(0, b * 8 + s, &buf[s as usize * 512..(s as usize + 1) * 512]),
            first,
            "block {b} mixes writes"
        );
    }
    first
}

/// Asserts the serial each sector of block `b` reads as (`want(sector in block)`).
fn assert_sectors(c: &Cache, b: u64, want: impl Fn(u64) -> u64) {
    let mut buf = vec![0u8; 4096];
    c.read(0, b * 4096, &mut buf).unwrap();
    for s in 0..8u64 {
        assert_eq!(
            decode_sector(0, b * 8 + s, &buf[s as usize * 512..(s as usize + 1) * 512]),
            Some(want(s)),
            "block {b} sector {s}"
        );
    }
}

fn no_writeback() -> Tunables {
    Tunables {
        writeback_enabled: false,
        // These tests were written with staging on (the default until 2026-12).
        stage_lines: 8,
        ..Tunables::default()
    }
}

/// The image of a device, as a process kill leaves it (no clean close).
fn image(d: &Arc<dyn BlockDevice>) -> Vec<u8> {
    let mut b = vec![0u8; d.size() as usize];
    d.read_at(&mut b, 0).unwrap();
    b
}

fn reopen(cache: Vec<u8>, backing: Vec<u8>) -> (Cache, Arc<dyn BlockDevice>) {
    let (c, _, b, _) = recover(cache, backing);
    (c, b)
}

/// Opens images as a restart after a crash does, with the recovery report.
fn recover(
    cache: Vec<u8>,
    backing: Vec<u8>,
) -> (
    Cache,
    Arc<dyn BlockDevice>,
    Arc<dyn BlockDevice>,
    lc_cache::RecoveryReport,
) {
    let c: Arc<dyn BlockDevice> = Arc::new(MemDevice::from_bytes(cache, "cache"));
    let b: Arc<dyn BlockDevice> = Arc::new(MemDevice::from_bytes(backing, "backing"));
    let (cache, report) = Cache::open(
        c.clone(),
        backings(std::slice::from_ref(&b)),
        OpenOptions {
            tunables: no_writeback(),
            ..Default::default()
        },
    )
    .unwrap();
    (cache, c, b, report)
}

/// The newest header of segment `id` in a cache image (of the cache its superblock
/// names).
fn newest_header_in(img: &[u8], g: &Geometry, id: u64) -> SegmentHeader {
    let sb = Superblock::decode(&img[..SB_COPY_SIZE], "c")
        .or_else(|_| Superblock::decode(&img[SB_COPY_SIZE..2 * SB_COPY_SIZE], "c"))
        .unwrap();
    let off = g.segment_offset(id) as usize;
    newest_header(&img[off..off + g.data_start()], g, id, &sb.uuid)
        .unwrap()
        .0
}

/// A fresh format-2 cache of 16 segments of `seg` bytes (4 RAM buffers, no writeback)
/// over a backing device: the cache, its device and the backing device.
fn fresh(seg: u32) -> (Cache, Arc<dyn BlockDevice>, Arc<dyn BlockDevice>) {
    let cache = mem_cache(seg as u64 * 16, 512, seg);
    let (c, backing) = open_with(cache.clone(), no_writeback());
    (c, cache, backing)
}

/// Opens `cache` with tunables `t` and a new backing device, which it returns too.
fn open_with(cache: Arc<dyn BlockDevice>, t: Tunables) -> (Cache, Arc<dyn BlockDevice>) {
    let backing: Arc<dyn BlockDevice> = Arc::new(MemDevice::new(BACKING));
    let c = open(cache, std::slice::from_ref(&backing), t, 4);
    (c, backing)
}

/// Writeback off, staging at its default (off): appends write every line themselves.
fn unstaged() -> Tunables {
    Tunables {
        writeback_enabled: false,
        ..Tunables::default()
    }
}

/// Segments a single writer uses with a flush after every 4 KiB write, and the appends
/// the cache counted (all, and those the writer's own thread did).
fn sync_writer(version: u32, writes: u64) -> (u64, u64, u64) {
    let cache = mem_cache_v(SEG as u64 * 64, 512, SEG, version);
    let backing: Arc<dyn BlockDevice> = Arc::new(MemDevice::new(BACKING));
    let c = open(
        cache.clone(),
        std::slice::from_ref(&backing),
        no_writeback(),
        4,
    );
    let before = c.stats().open_segment_id;
    for b in 0..writes {
        c.write(0, b * 4096, &block(1, b), false).unwrap();
        c.flush().unwrap();
    }
    let s = c.stats();
    let used = s.open_segment_id - before + 1;
    // Every acknowledged block survives a kill.
    let (img, back) = (image(&cache), image(&backing));
    std::mem::forget(c);
    let (c2, _) = reopen(img, back);
    for b in 0..writes {
        assert_eq!(serial_of(&c2, b), Some(1), "format {version} block {b}");
    }
    (used, s.appends, s.caller_appends)
}

#[test]
fn a_flush_after_every_write_fills_the_cache_at_the_rate_of_its_data() {
    let writes = 100;
    let (used, appends, by_caller) = sync_writer(2, writes);
    let data = writes * 4096;
    let space = used * SEG as u64;
    assert!(
        space as f64 <= 2.2 * data as f64,
        "format 2: {used} segments of {SEG} for {data} bytes of data"
    );
    assert!(appends >= writes - used, "{appends} appends");
    // A flush that finds the flusher idle appends on its own thread (the blocks it
    // made durable survived the kill in `sync_writer`).
    assert!(
        by_caller > 0,
        "no append by the flushing thread of {appends}"
    );
    // Format 1 seals a segment per flush.
    let (used1, appends1, _) = sync_writer(1, writes);
    assert_eq!(appends1, 0);
    assert!(used1 >= writes, "format 1 used {used1} segments");
}

#[test]
fn a_line_rewritten_after_an_append_takes_a_new_line_and_the_newest_copy_wins() {
    let (c, cache, backing) = fresh(SEG);
    // Blocks 0..4 appended, then rewritten (whole and in part) and appended again,
    // all in one segment (14 lines).
    for b in 0..4 {
        c.write(0, b * 4096, &block(1, b), false).unwrap();
    }
    c.flush().unwrap();
    c.write(0, 4096, &block(2, 1), true).unwrap(); // FUA: an append of its own
    let part = block(3, 2);
    c.write(0, 2 * 4096 + 1024, &part[1024..2048], false)
        .unwrap();
    c.flush().unwrap();
    c.write(0, 3 * 4096, &block(4, 3), false).unwrap(); // acknowledged, not durable
    assert!(c.stats().appends >= 3);
    assert_eq!(c.stats().open_segment_id, 1, "still the first segment");
    let (img, back) = (image(&cache), image(&backing));
    std::mem::forget(c);
    let (c2, _) = reopen(img, back);
    assert_eq!(serial_of(&c2, 0), Some(1));
    assert_eq!(serial_of(&c2, 1), Some(2));
    assert_sectors(&c2, 2, |s| if s == 2 || s == 3 { 3 } else { 1 });
    // Block 3's last write was never flushed: either value is allowed.
    assert!(matches!(serial_of(&c2, 3), Some(1) | Some(4)));
    // Writing goes on in the next segment, and survives another kill.
    c2.write(0, 5 * 4096, &block(5, 5), true).unwrap();
    assert_eq!(serial_of(&c2, 5), Some(5));
}

/// Waits (up to 5 s) until the flusher has staged at least `lines` lines.
fn wait_staged(c: &Cache, lines: u64) {
    let t = std::time::Instant::now();
    while c.stats().staged_lines < lines {
        assert!(t.elapsed().as_secs() < 5, "the flusher staged no lines");
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
}

#[test]
fn lines_staged_between_flushes_are_immutable_and_the_newest_copy_survives_a_kill() {
    let seg = 4 * SEG; // room for every line below in one segment
    let (c, cache, backing) = fresh(seg);
    // An append makes the flusher stage the lines that follow, before any flush.
    c.write(0, 0, &block(1, 0), true).unwrap();
    for b in 1..=8 {
        c.write(0, b * 4096, &block(1, b), false).unwrap();
    }
    wait_staged(&c, 8);
    // Staged lines are on the device: rewrites of them take new lines.
    c.write(0, 4096, &block(2, 1), false).unwrap();
    let part = block(3, 2);
    c.write(0, 2 * 4096 + 512, &part[512..1024], false).unwrap();
    c.flush().unwrap();
    // Staged but never flushed: either value may come back, never a mix.
    for b in 3..=10 {
        c.write(0, b * 4096, &block(4, b), false).unwrap();
    }
    wait_staged(&c, 16);
    let s = c.stats();
    assert_eq!(s.open_segment_id, 1, "still the first segment");
    assert!(s.appends >= 2);
    let (img, back) = (image(&cache), image(&backing));
    std::mem::forget(c);
    let (c2, _) = reopen(img, back);
    assert_eq!(serial_of(&c2, 0), Some(1));
    assert_eq!(serial_of(&c2, 1), Some(2));
    assert_sectors(&c2, 2, |s| if s == 1 { 3 } else { 1 });
    for b in 3..=10 {
        let s = serial_of(&c2, b);
        assert!(
            matches!(s, Some(4)) || s == Some(if b <= 8 { 1 } else { 0 }),
            "block {b}: {s:?}"
        );
    }
    // The log goes on after the staged lines recovery did not take.
    c2.write(0, 11 * 4096, &block(5, 11), true).unwrap();
    assert_eq!(serial_of(&c2, 11), Some(5));
}

#[test]
fn a_format_1_cache_opens_serves_and_writes_back() {
    let cache = mem_cache_v(SEG as u64 * 16, 512, SEG, 1);
    let backing: Arc<dyn BlockDevice> = Arc::new(MemDevice::new(BACKING));
    let c = open(
        cache.clone(),
        std::slice::from_ref(&backing),
        no_writeback(),
        4,
    );
    assert_eq!(c.geometry().version, 1);
    assert_eq!(c.geometry().lines_per_segment, 15);
    for b in 0..40 {
        c.write(0, b * 4096, &block(1, b), false).unwrap();
    }
    c.flush().unwrap();
    c.close().unwrap();
    let c = open(
        cache.clone(),
        std::slice::from_ref(&backing),
        Tunables::default(),
        4,
    );
    for b in 0..40 {
        assert_eq!(serial_of(&c, b), Some(1));
    }
    c.drain(0, &mut |_| {}).unwrap();
    c.close().unwrap();
    // Written back: the backing device holds every block.
    let back = image(&backing);
    for b in 0..40u64 {
        let s = (b * 4096) as usize;
        assert_eq!(decode_sector(0, b * 8, &back[s..s + 512]), Some(1));
    }
    assert_eq!(
        lc_cache::probe(cache.as_ref())
            .unwrap()
            .unwrap()
            .geometry
            .version,
        1
    );
}

#[test]
fn a_torn_last_append_is_never_claimed_durable_by_the_next_life() {
    // Three appends to one segment; the power is cut before the third one's flush,
    // with its header on the device and its line not. Recovery takes the segment at
    // the second append. The next life must not claim the segment durable (in a
    // superblock or checkpoint) before a segment after it is durable: the next
    // recovery would take the torn third append for a durable one and report its
    // line lost.
    let (c, cache, backing) = fresh(SEG);
    for b in 0..3 {
        c.write(0, b * 4096, &block(b + 1, b), true).unwrap();
    }
    let s = c.stats();
    assert_eq!(s.open_segment_id, 1, "one segment");
    assert!(s.appends >= 3, "{} appends", s.appends);
    let (mut img, back) = (image(&cache), image(&backing));
    std::mem::forget(c);
    let third = block(3, 2);
    let at = img
        .chunks(4096)
        .position(|l| l == &third[..])
        .expect("the third line in the image");
    img[at * 4096..(at + 1) * 4096].fill(0);
    let (c2, dev, _, report) = recover(img, back);
    assert!(report.damaged.is_empty(), "{report:?}");
    assert_eq!(serial_of(&c2, 0), Some(1));
    assert_eq!(serial_of(&c2, 1), Some(2));
    // The next life commits its superblock and is killed before writing a segment.
    c2.commit_superblock().unwrap();
    let (img, back) = (image(&dev), image(&backing));
    std::mem::forget(c2);
    let (c3, _, _, report) = recover(img, back);
    assert!(report.damaged.is_empty(), "{report:?}");
    assert_eq!(serial_of(&c3, 0), Some(1));
    assert_eq!(serial_of(&c3, 1), Some(2));
    let mut buf = vec![0u8; 4096];
    c3.read(0, 2 * 4096, &mut buf).unwrap();
}

#[test]
fn many_sealed_segments_written_at_once_have_sound_headers_after_a_kill() {
    // A slow cache device: writers fill many RAM buffers while the flusher writes, so
    // it then writes long runs of sealed segments, their final headers encoded 8 at a
    // time and the segments written in vectored runs. Every one must be sound: a kill
    // after the flush loses nothing and recovery finds no damage and no torn tail.
    let segs = 48u64;
    let slow = Arc::new(Slow {
        inner: MemDevice::new(SEG as u64 * (segs + 16)),
        delay: std::time::Duration::from_millis(3),
    });
    lc_cache::format_device(
        slow.as_ref(),
        lc_cache::FormatOptions {
            block_size: 512,
            segment_size: SEG,
            version: 2,
        },
    )
    .unwrap();
    let cache: Arc<dyn BlockDevice> = slow.clone();
    let backing: Arc<dyn BlockDevice> = Arc::new(MemDevice::new(BACKING));
    let c = open(cache, std::slice::from_ref(&backing), no_writeback(), 40);
    let blocks = (segs - 8) * (SEG as u64 / 4096);
    for b in 0..blocks {
        c.write(0, b * 4096, &block(7, b), false).unwrap();
    }
    c.flush().unwrap();
    let mut img = vec![0u8; slow.inner.size() as usize];
    slow.inner.read_at(&mut img, 0).unwrap();
    let back = image(&backing);
    std::mem::forget(c);
    let (c2, _, _, report) = recover(img, back);
    assert!(report.damaged.is_empty(), "{report:?}");
    assert!(report.tail.is_none(), "{report:?}");
    for b in 0..blocks {
        assert_eq!(serial_of(&c2, b), Some(7), "block {b}");
    }
}

#[test]
fn the_cleaner_moves_the_lines_of_a_segment_recovery_took_at_an_older_append() {
    // Segment 1 gets four appends (blocks 0..4, FUA each), then fills and is sealed;
    // blocks 1..4 are rewritten in segment 2. The sealed header of segment 1 is damaged:
    // recovery takes its fourth append (block 0 still live there, dirty) and reports
    // the lines added after it unknown. Once the loss is accepted, the cleaner cleans
    // segment 1: its live line must reach a newer segment (or the backing device)
    // before the segment is released, and read back after another restart.
    let (c, cache, backing) = fresh(SEG);
    for b in 0..4 {
        c.write(0, b * 4096, &block(1, b), true).unwrap();
    }
    let lps = c.geometry().lines_per_segment as u64;
    for b in 4..lps + 4 {
        c.write(0, b * 4096, &block(1, b), false).unwrap();
    }
    for b in 1..4 {
        c.write(0, b * 4096, &block(2, b), false).unwrap();
    }
    // Segment 2 filled and sealed, and the superblock claims it durable: recovery
    // replays it past the damaged one.
    for b in lps + 4..2 * lps + 8 {
        c.write(0, b * 4096, &block(1, b), false).unwrap();
    }
    c.flush().unwrap();
    c.commit_superblock().unwrap();
    assert!(c.stats().open_segment_id >= 3);
    let (mut img, back) = (image(&cache), image(&backing));
    let g = c.geometry();
    std::mem::forget(c);
    // Flip a byte of segment 1's newest header copy.
    let h = newest_header_in(&img, &g, 1);
    let off = g.segment_offset(1) as usize;
    assert!(
        h.gen > 4,
        "segment 1 sealed after its appends (gen {})",
        h.gen
    );
    img[off + g.header_copy(h.gen) * g.header_len() + 70] ^= 0x80;
    let (c2, dev, bdev, report) = recover(img, back);
    assert!(
        report.damaged.iter().any(|(id, _)| *id == 1),
        "segment 1 damaged: {report:?}"
    );
    c2.accept_loss();
    assert_eq!(serial_of(&c2, 0), Some(1), "block 0 from the older append");
    // Clean: moving on, writeback off, the log run short by rewrites of a few lines
    // (the cleaner runs only then).
    let t0 = std::time::Instant::now();
    let mut n = 0;
    while c2.stats().last_writeback_id < 1 {
        assert!(
            t0.elapsed() < std::time::Duration::from_secs(20),
            "segment 1 never cleaned"
        );
        let b = 2 * lps + 8 + n % 4;
        c2.write(0, b * 4096, &block(3, b), n % 64 == 0).unwrap();
        n += 1;
    }
    c2.flush().unwrap();
    assert_eq!(serial_of(&c2, 0), Some(1));
    assert!(
        c2.stats().moved_lines > 0,
        "the cleaner moved segment 1's live line"
    );
    let (img, back) = (image(&dev), image(&bdev));
    std::mem::forget(c2);
    let (c3, _, _, report) = recover(img, back);
    assert_eq!(
        serial_of(&c3, 0),
        Some(1),
        "block 0 after segment 1 was released: {report:?}"
    );
}

#[test]
fn a_segment_left_over_from_before_a_torn_tail_is_never_replayed_after_the_writeback_point() {
    // Life 1 writes segments 1 and 2 (serial 1). The power cut keeps segment 2 and
    // loses segment 1 (never flushed: nothing claims it durable), so recovery ends the
    // log at segment 0 and segment 2 stays in its slot, left over. Life 2 rewrites
    // lines of segment 2 (serial 2, FUA) in a new segment 1 and drains it: the
    // writeback point is 1. Life 3 walks from segment 2 and must not take the
    // left-over one: those lines read serial 2 (a crash test caught clean copies of
    // zeros replayed this way).
    let (c, cache, backing) = fresh(SEG);
    let lps = c.geometry().lines_per_segment as u64;
    for b in 0..2 * lps {
        c.write(0, b * 4096, &block(1, b), false).unwrap();
    }
    c.seal_now().unwrap();
    let g = c.geometry();
    let (mut img, back) = (image(&cache), image(&backing));
    std::mem::forget(c);
    let h2 = newest_header_in(&img, &g, 2);
    assert!(
        h2.durable < 1,
        "segment 2 claims segment 1 durable: not a torn tail"
    );
    let off1 = g.segment_offset(1) as usize;
    img[off1..off1 + SEG as usize].fill(0);
    let (c2, dev, bdev, report) = recover(img, back);
    assert_eq!(report.replayed_segments, 0, "{report:?}");
    for b in lps..lps + 2 {
        c2.write(0, b * 4096, &block(2, b), true).unwrap();
    }
    c2.drain(0, &mut |_| {}).unwrap();
    assert_eq!(c2.stats().last_writeback_id, 1);
    let (img, back) = (image(&dev), image(&bdev));
    std::mem::forget(c2);
    let (c3, _, _, report) = recover(img, back);
    for b in lps..lps + 2 {
        assert_eq!(serial_of(&c3, b), Some(2), "block {b}: {report:?}");
    }
}

#[test]
fn a_flush_that_appends_after_a_sealed_segment_flushes_the_cache_device_once() {
    // The sealed segment's write is held, so the flusher (not the flushing thread) does
    // the append that follows it; the append's own device flush covers the segment.
    let img = image(&mem_cache(SEG as u64 * 16, 512, SEG));
    let dev = Gated::new(img);
    let cache: Arc<dyn BlockDevice> = dev.clone();
    let backing: Arc<dyn BlockDevice> = Arc::new(MemDevice::new(BACKING));
    let c = open(
        cache.clone(),
        std::slice::from_ref(&backing),
        no_writeback(),
        4,
    );
    let lps = c.geometry().lines_per_segment as u64;
    dev.hold_next_write();
    for b in 0..=lps {
        c.write(0, b * 4096, &block(1, b), false).unwrap();
    }
    dev.wait_held();
    let before = dev.flushes.load(std::sync::atomic::Ordering::SeqCst);
    std::thread::scope(|s| {
        let f = s.spawn(|| c.flush());
        // The flush request is in before the segment's write goes on.
        std::thread::sleep(std::time::Duration::from_millis(100));
        dev.release();
        f.join().unwrap().unwrap();
    });
    let flushes = dev.flushes.load(std::sync::atomic::Ordering::SeqCst) - before;
    assert_eq!(flushes, 1, "device flushes for one Cache::flush");
    assert_eq!(c.stats().appends, 1);
    let (img, back) = (image(&cache), image(&backing));
    std::mem::forget(c);
    let (c2, _) = reopen(img, back);
    for b in 0..=lps {
        assert_eq!(serial_of(&c2, b), Some(1), "block {b}");
    }
}

#[test]
fn appends_count_their_time_under_the_lock_apart_from_their_writes() {
    // 1 MiB segments, 64 lines per append: each append's crcs and copy of 256 KiB
    // take the lock for a measurable time, counted beside its write and flush time.
    let (c, _, _) = fresh(1 << 20);
    for round in 0..8u64 {
        for b in 0..64 {
            c.write(0, (round * 64 + b) * 4096, &block(round + 1, b), false)
                .unwrap();
        }
        c.flush().unwrap();
    }
    let s = c.stats();
    assert!(s.appends >= 8, "{} appends", s.appends);
    assert!(s.append_locked_us > 0, "{s:?}");
    assert!(s.append_write_us > 0, "{s:?}");
}

#[test]
fn a_segment_sealed_while_its_append_waits_for_the_device_keeps_every_line() {
    // The append of blocks 0..3 writes its lines and header outside the engine lock and
    // takes the segment's new crc only once durable; here its device flush is held while
    // writers fill the segment and one of them seals it, so the sealed segment's final
    // header must cover the appended lines again from the crc before the append.
    let img = image(&mem_cache(SEG as u64 * 16, 512, SEG));
    let dev = Gated::new(img);
    let cache: Arc<dyn BlockDevice> = dev.clone();
    let (c, backing) = open_with(cache.clone(), unstaged());
    let lps = c.geometry().lines_per_segment as u64;
    for b in 0..3 {
        c.write(0, b * 4096, &block(1, b), false).unwrap();
    }
    dev.hold_next_flush();
    std::thread::scope(|s| {
        let f = s.spawn(|| c.flush());
        dev.wait_held();
        for b in 3..lps + 2 {
            c.write(0, b * 4096, &block(2, b), false).unwrap();
        }
        assert!(c.stats().open_segment_id > 1, "segment 1 sealed");
        dev.release();
        f.join().unwrap().unwrap();
    });
    // What a kill now leaves: the flushed append at least.
    let (img, back) = (image(&cache), image(&backing));
    let (c2, _, _, report) = recover(img, back);
    assert!(report.damaged.is_empty(), "{report:?}");
    for b in 0..3 {
        assert_eq!(serial_of(&c2, b), Some(1), "block {b}");
    }
    for b in 3..lps + 2 {
        assert!(
            matches!(serial_of(&c2, b), Some(0) | Some(2)),
            "block {b}: not durable yet, so zeros or the one write: {:?}",
            serial_of(&c2, b)
        );
    }
    drop(c2);
    c.flush().unwrap();
    let (img, back) = (image(&cache), image(&backing));
    std::mem::forget(c);
    let (c3, _, _, report) = recover(img, back);
    assert!(report.damaged.is_empty(), "{report:?}");
    for b in 0..lps + 2 {
        assert_eq!(
            serial_of(&c3, b),
            Some(if b < 3 { 1 } else { 2 }),
            "block {b}"
        );
    }
}

#[test]
fn a_first_append_writes_zeros_over_the_other_header_copy_whatever_the_last_append_left() {
    // Appends copy their lines into one reused buffer. The second append of segment 1
    // leaves lines where the next segment's first append puts the zeros of header
    // copy 1: they must go out as zeros, or an older header of the slot could outlive
    // the lines written over its data.
    let cache = mem_cache(SEG as u64 * 16, 512, SEG);
    let (c, _) = open_with(cache.clone(), unstaged());
    let g = c.geometry();
    let lps = g.lines_per_segment as u64;
    // Appends of lines 0..3 and 3..6, then segment 1 sealed and segment 2 appended.
    for run in [0..3, 3..6, 6..lps + 3] {
        for b in run {
            c.write(0, b * 4096, &block(1, b), false).unwrap();
        }
        c.flush().unwrap();
    }
    assert!(c.stats().appends >= 3, "{:?}", c.stats());
    let off = g.segment_offset(2) as usize;
    let img = image(&cache);
    let (hl, ds) = (g.header_len(), g.data_start());
    assert!(
        img[off + hl..off + ds].iter().all(|&x| x == 0),
        "header copy 1 of segment 2 after its first append"
    );
    drop(c);
}
