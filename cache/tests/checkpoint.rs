//! Checkpoints (format 2, docs/FORMAT.md "Checkpoint"): a clean stop writes one so the
//! next open replays nothing; after a kill only the segments after the newest
//! checkpoint are replayed; a torn checkpoint falls back to the other area or to the
//! whole log; a checkpoint whose segments were all written back since is skipped.

mod common;

use std::sync::Arc;

use common::*;
use lc_cache::format::Geometry;
use lc_cache::{BlockDevice, Cache, MemDevice, OpenOptions, RecoveryReport, Tunables};

const SEG: u32 = 64 << 10;
const BACKING: u64 = 4 << 20;
const CACHE: u64 = 64 * SEG as u64;

fn block(serial: u64, b: u64) -> Vec<u8> {
    tagged_block(serial, b)
}

fn tunables(every: u32) -> Tunables {
    Tunables {
        writeback_enabled: false,
        flush_interval_s: 0,
        checkpoint_interval_segments: every,
        ..Tunables::default()
    }
}

fn image(d: &Arc<dyn BlockDevice>) -> Vec<u8> {
    let mut b = vec![0u8; d.size() as usize];
    d.read_at(&mut b, 0).unwrap();
    b
}

fn reopen(cache: Vec<u8>, backing: Vec<u8>, t: Tunables) -> (Cache, RecoveryReport) {
    let (c, r, _, _) = reopen_devs(cache, backing, t);
    (c, r)
}

fn reopen_devs(
    cache: Vec<u8>,
    backing: Vec<u8>,
    t: Tunables,
) -> (
    Cache,
    RecoveryReport,
    Arc<dyn BlockDevice>,
    Arc<dyn BlockDevice>,
) {
    let c: Arc<dyn BlockDevice> = Arc::new(MemDevice::from_bytes(cache, "cache"));
    let b: Arc<dyn BlockDevice> = Arc::new(MemDevice::from_bytes(backing, "backing"));
    let (cache, r) = Cache::open(
        c.clone(),
        backings(std::slice::from_ref(&b)),
        OpenOptions {
            ram_bytes: 4 * SEG as u64,
            tunables: t,
            ..Default::default()
        },
    )
    .unwrap();
    (cache, r, c, b)
}

/// Writes `n` blocks at random places (serials from `*serial + 1`), flushing now and
/// then; `model[b]` is the newest serial of block b.
fn write_some(
    c: &Cache,
    model: &mut [u64],
    serial: &mut u64,
    n: usize,
    rng: &mut rand::rngs::SmallRng,
) {
    use rand::Rng;
    for _ in 0..n {
        *serial += 1;
        let b = rng.gen_range(0..model.len() as u64);
        c.write(0, b * 4096, &block(*serial, b), false).unwrap();
        model[b as usize] = *serial;
        if rng.gen_bool(0.05) {
            c.flush().unwrap();
        }
    }
    c.flush().unwrap();
}

fn check(c: &Cache, model: &[u64], ctx: &str) {
    let mut buf = vec![0u8; 4096];
    for (b, &want) in model.iter().enumerate() {
        c.read(0, b as u64 * 4096, &mut buf).unwrap();
        for s in 0..8usize {
            let got = decode_sector(0, b as u64 * 8 + s as u64, &buf[s * 512..(s + 1) * 512]);
            assert_eq!(got, Some(want), "{ctx}: block {b} sector {s}");
        }
    }
}

fn setup(
    seed: u64,
    every: u32,
) -> (
    Cache,
    Arc<dyn BlockDevice>,
    Arc<dyn BlockDevice>,
    rand::rngs::SmallRng,
) {
    let cache = mem_cache(CACHE, 512, SEG);
    let backing: Arc<dyn BlockDevice> = Arc::new(MemDevice::new(BACKING));
    let c = open(
        cache.clone(),
        std::slice::from_ref(&backing),
        tunables(every),
        4,
    );
    (c, cache, backing, rng(seed))
}

#[test]
fn interval_zero_writes_no_checkpoint() {
    let (c, cache, backing, mut rng) = setup(seed("cp-none"), 0);
    let mut model = vec![0u64; 600];
    let mut serial = 0;
    write_some(&c, &mut model, &mut serial, 400, &mut rng);
    c.close().unwrap();
    let (c, r) = reopen(image(&cache), image(&backing), tunables(1000));
    assert!(r.checkpoint.is_none() && r.replayed_segments > 10, "{r:?}");
    check(&c, &model, "no checkpoint");
}

/// Opens a cache, writes, closes cleanly with checkpoints on; returns its images.
fn closed_with_checkpoint(seed: u64) -> (Vec<u8>, Vec<u8>, Vec<u64>) {
    let (c, cache, backing, mut rng) = setup(seed, 1000);
    let mut model = vec![0u64; 600];
    let mut serial = 0;
    write_some(&c, &mut model, &mut serial, 400, &mut rng);
    c.close().unwrap();
    (image(&cache), image(&backing), model)
}

#[test]
fn after_a_clean_stop_nothing_is_replayed() {
    let (img, back, model) = closed_with_checkpoint(seed("cp-stop"));
    let (c, r) = reopen(img, back, tunables(1000));
    let cp = r.checkpoint.clone().expect("checkpoint used");
    assert_eq!(r.replayed_segments, 0, "{r:?}");
    assert!(cp.loaded > 0 && cp.loaded == r.restored_lines, "{r:?}");
    // Before the reads (they promote lines, which may fill and seal segments).
    let s = c.stats();
    check(&c, &model, "after clean stop");
    assert_eq!(
        s.last_flushed_id, cp.upto,
        "writing resumes after the checkpoint's segment"
    );
}

#[test]
fn after_a_kill_only_segments_after_the_periodic_checkpoint_are_replayed() {
    let (c, cache, backing, mut rng) = setup(seed("cp-kill"), 0);
    let mut model = vec![0u64; 600];
    let mut serial = 0;
    write_some(&c, &mut model, &mut serial, 300, &mut rng);
    assert!(c.checkpoint().unwrap(), "checkpoint written");
    let upto = c.stats().last_flushed_id;
    write_some(&c, &mut model, &mut serial, 60, &mut rng);
    let end = c.stats().last_flushed_id;
    assert!(end > upto + 2);
    // Killed: the image as the devices hold it, no clean close.
    let (img, back) = (image(&cache), image(&backing));
    c.kill();
    let (c, r) = reopen(img, back, tunables(0));
    let cp = r.checkpoint.clone().expect("checkpoint used");
    assert_eq!(cp.upto, upto, "{r:?}");
    // The segments sealed after it, and the open one when a flush appended to it.
    let n = r.replayed_segments;
    assert!(n == end - upto || n == end - upto + 1, "{r:?}");
    check(&c, &model, "after kill");
}

#[test]
fn the_periodic_checkpoint_thread_bounds_the_replay() {
    let (c, cache, backing, mut rng) = setup(seed("cp-periodic"), 3);
    let mut model = vec![0u64; 600];
    let mut serial = 0;
    for _ in 0..8 {
        write_some(&c, &mut model, &mut serial, 60, &mut rng);
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let (img, back) = (image(&cache), image(&backing));
    let written = c.stats().last_flushed_id;
    c.kill();
    let (c, r) = reopen(img, back, tunables(0));
    let cp = r.checkpoint.clone().expect("a periodic checkpoint");
    let n = cp.upto + r.replayed_segments;
    assert!(n == written || n == written + 1, "{r:?}");
    // The thread may lag a little behind; the replay stays far below the log.
    assert!(r.replayed_segments < written / 2, "{r:?} of {written}");
    check(&c, &model, "periodic");
}

/// The area holding checkpoint number `seq`.
fn area_off(img: &[u8], seq_wanted: u64) -> usize {
    let g = Geometry::new(512, SEG, img.len() as u64).unwrap();
    let off = g.checkpoint_offset(seq_wanted % 2) as usize;
    let seq = u64::from_le_bytes(img[off + 32..off + 40].try_into().unwrap());
    assert_eq!(seq, seq_wanted);
    off
}

#[test]
fn a_torn_checkpoint_falls_back_to_the_other_area_then_to_the_whole_log() {
    let (c, cache, backing, mut rng) = setup(seed("cp-torn"), 0);
    let mut model = vec![0u64; 600];
    let mut serial = 0;
    write_some(&c, &mut model, &mut serial, 200, &mut rng);
    assert!(c.checkpoint().unwrap());
    let first = c.stats().last_flushed_id;
    write_some(&c, &mut model, &mut serial, 100, &mut rng);
    assert!(c.checkpoint().unwrap());
    let second = c.stats().last_flushed_id;
    write_some(&c, &mut model, &mut serial, 30, &mut rng);
    let (img, back) = (image(&cache), image(&backing));
    c.kill();
    let (c, r) = reopen(img.clone(), back.clone(), tunables(0));
    assert_eq!(
        r.checkpoint.as_ref().map(|c| (c.seq, c.upto)),
        Some((2, second)),
        "{r:?}"
    );
    check(&c, &model, "newest");
    drop(c);
    // Checkpoint 2's entries torn (its header written, part of its entries not).
    let mut torn = img.clone();
    let off = area_off(&torn, 2);
    torn[off + 4096 + 100..off + 4096 + 612].fill(0);
    let (c, r) = reopen(torn.clone(), back.clone(), tunables(0));
    assert_eq!(
        r.checkpoint.as_ref().map(|c| (c.seq, c.upto)),
        Some((1, first)),
        "{r:?}"
    );
    assert!(
        r.checkpoint_skipped
            .iter()
            .any(|s| s.contains("checkpoint 2")),
        "{r:?}"
    );
    check(&c, &model, "older checkpoint");
    drop(c);
    // Both torn: the whole log is walked.
    let off = area_off(&torn, 1);
    torn[off + 10] ^= 1;
    let (c, r) = reopen(torn, back, tunables(0));
    assert!(r.checkpoint.is_none(), "{r:?}");
    assert_eq!(
        r.replayed_segments,
        c.stats().last_flushed_id - r.last_writeback_id,
        "{r:?}"
    );
    check(&c, &model, "no checkpoint");
}

#[test]
fn a_checkpoint_written_back_since_is_skipped() {
    let (img, back, model) = closed_with_checkpoint(seed("cp-old"));
    // Write everything back with no new checkpoint (interval 0), then reopen: the
    // checkpoint covers only segments at or before the writeback point.
    let (c, r, cdev, bdev) = reopen_devs(img, back, tunables(0));
    assert!(r.checkpoint.is_some(), "{r:?}");
    c.set_tunable("writeback_enabled", "true").unwrap();
    c.drain(0, &mut |_| {}).unwrap();
    c.close().unwrap();
    let (c, r) = reopen(image(&cdev), image(&bdev), tunables(0));
    assert!(r.checkpoint.is_none(), "{r:?}");
    assert!(
        r.checkpoint_skipped
            .iter()
            .any(|s| s.contains("written back")),
        "{r:?}"
    );
    assert_eq!((r.replayed_segments, r.restored_lines), (0, 0), "{r:?}");
    check(&c, &model, "written back");
}

#[test]
fn format_1_has_no_checkpoints() {
    let cache = mem_cache_v(CACHE, 512, SEG, 1);
    let backing: Arc<dyn BlockDevice> = Arc::new(MemDevice::new(BACKING));
    let c = open(
        cache.clone(),
        std::slice::from_ref(&backing),
        tunables(1),
        4,
    );
    let mut model = vec![0u64; 600];
    let mut serial = 0;
    let mut rng = rng(1);
    write_some(&c, &mut model, &mut serial, 200, &mut rng);
    assert!(!c.checkpoint().unwrap());
    c.close().unwrap();
    let (c, r) = reopen(image(&cache), image(&backing), tunables(1));
    assert!(
        r.checkpoint.is_none() && r.checkpoint_skipped.is_empty(),
        "{r:?}"
    );
    check(&c, &model, "format 1");
}

/// Recovery reads the slots after the checkpoint ahead of its walk, several at a time;
/// an unreadable sector changes nothing it would not have read itself: in the lines of
/// the slot after the log's end it does not matter, in the lines of a segment replayed
/// it fails the open with the offset, as the walk's own read does.
#[test]
fn unreadable_lines_matter_only_where_the_walk_reads_them() {
    use lc_cache::testing::FaultDevice;
    use lc_cache::Error;
    let (c, cache, backing, mut rng) = setup(seed("cp-unreadable"), 0);
    let mut model = vec![0u64; 600];
    let mut serial = 0;
    write_some(&c, &mut model, &mut serial, 300, &mut rng);
    assert!(c.checkpoint().unwrap(), "checkpoint written");
    let upto = c.stats().last_flushed_id;
    write_some(&c, &mut model, &mut serial, 60, &mut rng);
    let (img, back) = (image(&cache), image(&backing));
    c.kill();
    let geo = lc_cache::probe(cache.as_ref()).unwrap().unwrap().geometry;
    let open_with_bad = |id: u64| {
        let dev = Arc::new(FaultDevice::new(Arc::new(MemDevice::from_bytes(
            img.clone(),
            "cache",
        ))));
        let lines = geo.segment_offset(id) + geo.data_start() as u64;
        dev.faults
            .lock()
            .unwrap()
            .bad_read_sectors
            .insert(lines / 512 + 9);
        let b: Arc<dyn BlockDevice> = Arc::new(MemDevice::from_bytes(back.clone(), "backing"));
        let r = Cache::open(
            dev as Arc<dyn BlockDevice>,
            backings(std::slice::from_ref(&b)),
            OpenOptions {
                ram_bytes: 4 * SEG as u64,
                tunables: tunables(0),
                ..Default::default()
            },
        );
        (r, lines)
    };
    let (_, clean) = reopen(img.clone(), back.clone(), tunables(0));
    let end = upto + clean.replayed_segments;
    // The slot after the log's end: only its headers are needed.
    let (r, _) = open_with_bad(end + 1);
    let (c, r) = r.expect("opens");
    // The same recovery (how long it took aside).
    let untimed = |r: RecoveryReport| RecoveryReport {
        checkpoint_time: Default::default(),
        walk_time: Default::default(),
        ..r
    };
    assert_eq!(untimed(r), untimed(clean));
    check(&c, &model, "unreadable lines after the end");
    c.kill();
    // A segment replayed after the checkpoint: its lines are checked, so read.
    let (r, lines) = open_with_bad(upto + 1);
    match r {
        Err(Error::Io { offset, .. }) => assert_eq!(offset, lines),
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => panic!("opened with unreadable lines in a replayed segment"),
    }
}

#[test]
fn no_checkpoint_is_taken_while_segments_wait_in_ram_beyond_the_ring() {
    // The cleaner off (no reserve) and the backing device failing writeback: writers
    // fill the ring, then sealed segments wait in RAM for a slot. A checkpoint is not
    // taken then: it returns at once instead of waiting for segments that cannot be
    // written (or writing more entries than its area holds), and the next open
    // replays the ring.
    let cache = mem_cache(SEG as u64 * 9, 512, SEG);
    let mem: Arc<dyn BlockDevice> = Arc::new(MemDevice::new(BACKING));
    let failing = Arc::new(lc_cache::testing::FaultDevice::new(mem.clone()));
    failing
        .faults
        .lock()
        .unwrap()
        .bad_write_sectors
        .extend(0..BACKING / 512);
    let backing: Arc<dyn BlockDevice> = failing;
    let t = Tunables {
        clean_live_max: 0,
        ..tunables(0)
    };
    let c = Arc::new(open(
        cache.clone(),
        std::slice::from_ref(&backing),
        t.clone(),
        8,
    ));
    let g = c.geometry();
    let (nr, lps) = (g.nr_segments, g.lines_per_segment as u64);
    let lines = (nr + 3) * lps;
    for b in 0..lines {
        c.write(0, b * 4096, &block(1, b), false).unwrap();
    }
    assert!(
        c.stats().open_segment_id > nr + 1,
        "segments beyond the ring"
    );
    let (tx, rx) = std::sync::mpsc::channel();
    let c2 = c.clone();
    std::thread::spawn(move || tx.send(c2.checkpoint().map_err(|e| e.to_string())));
    let r = rx.recv_timeout(std::time::Duration::from_secs(20));
    // The flusher writes the ring's segments on its own time: the image below must
    // hold them all (under load it was taken before the last ones were written).
    let t0 = std::time::Instant::now();
    while c.stats().last_flushed_id < nr {
        assert!(
            t0.elapsed().as_secs() < 20,
            "the ring's segments never written"
        );
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    // Killed (a close would wait for the segments that cannot be written).
    std::mem::forget(c);
    assert_eq!(r.expect("the checkpoint returned"), Ok(false));
    let (img, back) = (image(&cache), image(&mem));
    let (c3, report) = reopen(img, back, t);
    assert!(report.checkpoint.is_none(), "{report:?}");
    assert_eq!(report.replayed_segments, nr, "{report:?}");
    for b in 0..nr * lps {
        let mut buf = vec![0u8; 4096];
        c3.read(0, b * 4096, &mut buf).unwrap();
        assert_eq!(decode_sector(0, b * 8, &buf[..512]), Some(1), "block {b}");
    }
}
