//! Scattered buffers: `write_vectored` copies each line straight from the caller's
//! slices (a line, or a sector, may span two of them) and `read_vectored` fills the
//! caller's slices from every place a line can live (RAM segment, cache device, backing
//! device, partial lines merged over backing data, discarded lines).

mod common;

use std::sync::Arc;

use common::*;
use lc_cache::stats::counter_index;
use lc_cache::{BlockDevice, MemDevice, Tunables};

const SEG: u32 = 64 << 10;

fn pattern(len: usize, salt: u8) -> Vec<u8> {
    (0..len)
        .map(|i| {
            (i as u8)
                .wrapping_mul(31)
                .wrapping_add(salt ^ (i >> 9) as u8)
        })
        .collect()
}

/// Every way of cutting a read of `len` bytes used below: one piece, cuts inside a
/// sector, on a sector, on a line, and many small pieces.
fn read_cuts(len: usize) -> Vec<Vec<usize>> {
    let mut v = vec![
        vec![],
        vec![100],
        vec![512, 4096 + 700],
        vec![4096, 8192],
        (1..len / 1000).map(|i| i * 1000).collect(),
    ];
    for c in &mut v {
        c.retain(|&x| x <= len);
    }
    v
}

/// Checks every way of reading `want` at `off`: `read_vectored` and `try_read_vectored`
/// cut every way of [`read_cuts`], and the caller's own reads of `start_read` (the
/// daemon's io_uring path) from the cache device `dev` when the engine hands them out.
/// Returns how many cuts `start_read` served.
fn check_reads(
    c: &lc_cache::Cache,
    dev: &Arc<dyn BlockDevice>,
    off: u64,
    want: &[u8],
    what: &str,
) -> usize {
    let mut started = 0;
    for cuts in read_cuts(want.len()) {
        let mut buf = vec![0xeeu8; want.len()];
        c.read_vectored(0, off, &mut pieces_mut(&mut buf, &cuts))
            .unwrap();
        assert!(buf == want, "{what}: read cut at {cuts:?} differs");
        let mut buf = vec![0xeeu8; want.len()];
        if let Some(r) = c.try_read_vectored(0, off, &mut pieces_mut(&mut buf, &cuts)) {
            r.unwrap();
            assert!(buf == want, "{what}: try_read cut at {cuts:?} differs");
        }
        let mut buf = vec![0xeeu8; want.len()];
        let plan = c
            .start_read(0, off, &mut pieces_mut(&mut buf, &cuts))
            .unwrap();
        if let Some(plan) = plan {
            for r in &plan.reads {
                dev.read_at(&mut buf[r.pos..r.pos + r.len], r.device_offset)
                    .unwrap();
            }
            assert!(
                c.finish_read(plan, &pieces(&buf, &cuts)),
                "{what}: nothing was reused"
            );
            assert!(buf == want, "{what}: start_read cut at {cuts:?} differs");
            started += 1;
        }
    }
    started
}

/// A cache of `segments` 64 KiB segments (writeback and the idle seal off, 4 RAM
/// buffers) over a 1 MiB backing device holding `pattern(.., salt)`; and that pattern,
/// the model of what reads must return.
fn cache_over_pattern(segments: u64, salt: u8) -> (lc_cache::Cache, Vec<u8>, Arc<dyn BlockDevice>) {
    let backing = pattern(1 << 20, salt);
    let disk: Arc<dyn BlockDevice> = Arc::new(MemDevice::from_bytes(backing.clone(), "b0"));
    let dev = mem_cache(SEG as u64 * segments, 512, SEG);
    let c = open(
        dev.clone(),
        &[disk],
        Tunables {
            writeback_enabled: false,
            flush_interval_s: 0,
            ..Tunables::default()
        },
        4,
    );
    (c, backing, dev)
}

#[test]
fn a_write_from_pieces_with_lines_and_sectors_across_piece_boundaries_reads_back_everywhere() {
    let (c, mut model, dev) = cache_over_pattern(16, 0x42);
    // 512 bytes into line 1, through line 4 and half of line 5: the first and last lines
    // are partial (their other sectors come from the backing device).
    let off = 4096 + 512;
    let data = pattern(4 * 4096 + 2048 - 512, 7);
    // Cuts: inside a sector (100), at a line boundary of the device (4096 - 512 into
    // the data), inside a sector of a middle line, and a 1-byte piece.
    let cuts = [100, 3584, 3584, 9000, 9001, 13000];
    c.write_vectored(0, off, &pieces(&data, &cuts), false)
        .unwrap();
    model[off as usize..off as usize + data.len()].copy_from_slice(&data);
    let (from, to) = (0u64, 8 * 4096);
    let want = &model[from as usize..to as usize];
    check_reads(&c, &dev, from, want, "open segment (RAM)");
    check_reads(
        &c,
        &dev,
        off,
        &model[off as usize..off as usize + 1024],
        "a part",
    );

    // Overwrite part of it in place (open segment), from other pieces.
    let off2 = 2 * 4096 + 1024;
    let data2 = pattern(4096, 99);
    c.write_vectored(0, off2, &pieces(&data2, &[1, 2, 3000]), false)
        .unwrap();
    model[off2 as usize..off2 as usize + 4096].copy_from_slice(&data2);
    check_reads(
        &c,
        &dev,
        from,
        &model[from as usize..to as usize],
        "after overwrite",
    );

    // On the cache device: whole dirty lines read straight into the pieces, partial
    // ones through the bounce.
    c.seal_now().unwrap();
    c.flush().unwrap();
    let disk_hits = |c: &lc_cache::Cache| {
        let n = c.stats().counters;
        n[counter_index(false, true, false, true)] + n[counter_index(false, true, false, false)]
    };
    let before = disk_hits(&c);
    check_reads(
        &c,
        &dev,
        from,
        &model[from as usize..to as usize],
        "cache device",
    );
    assert!(
        disk_hits(&c) > before,
        "the lines were read from the cache device"
    );

    // A discard in the middle reads as zeros.
    c.discard(0, 3 * 4096, 4096).unwrap();
    model[3 * 4096..4 * 4096].fill(0);
    check_reads(
        &c,
        &dev,
        from,
        &model[from as usize..to as usize],
        "discarded line",
    );

    // try_write from pieces lands the same way.
    let off3 = 6 * 4096 + 512;
    let data3 = pattern(2 * 4096, 3);
    if let Some(r) = c.try_write_vectored(0, off3, &pieces(&data3, &[5, 4100])) {
        r.unwrap();
    } else {
        c.write_vectored(0, off3, &pieces(&data3, &[5, 4100]), false)
            .unwrap();
    }
    model[off3 as usize..off3 as usize + data3.len()].copy_from_slice(&data3);
    check_reads(
        &c,
        &dev,
        from,
        &model[from as usize..to as usize],
        "after try_write",
    );
    c.close().unwrap();
}

#[test]
fn pieces_whose_total_is_not_whole_blocks_are_refused_and_change_nothing() {
    let cache = mem_cache(SEG as u64 * 16, 512, SEG);
    let disk: Arc<dyn BlockDevice> = Arc::new(MemDevice::new(1 << 20));
    let c = open(cache, &[disk], Tunables::default(), 4);
    let a = [1u8; 300];
    let b = [2u8; 300];
    assert!(c.write_vectored(0, 0, &[&a, &b], false).is_err());
    let mut buf = vec![9u8; 1024];
    c.read(0, 0, &mut buf).unwrap();
    assert!(buf.iter().all(|&x| x == 0));
    let (mut x, mut y) = ([0u8; 300], [0u8; 300]);
    assert!(c.read_vectored(0, 0, &mut [&mut x, &mut y]).is_err());
    // An empty list is an empty write.
    c.write_vectored(0, 0, &[], false).unwrap();
    c.close().unwrap();
}

#[test]
fn reads_of_lines_on_the_cache_device_in_any_slot_order_and_across_segments_read_back() {
    // Lines 0..40 written in order (consecutive slots, across segment boundaries:
    // 14 lines per 64 KiB segment), lines 40..60 in reverse (slots descending), then
    // one line rewritten in a later segment: reads of every range cut every way must
    // return the newest data whether the lines are read as one run or one by one.
    let (c, mut model, dev) = cache_over_pattern(32, 0x17);
    let mut put = |c: &lc_cache::Cache, line: usize, salt: u8| {
        let d = pattern(4096, salt);
        c.write(0, (line * 4096) as u64, &d, false).unwrap();
        model[line * 4096..(line + 1) * 4096].copy_from_slice(&d);
    };
    for line in 0..40 {
        put(&c, line, line as u8);
    }
    for line in (40..60).rev() {
        put(&c, line, line as u8 ^ 0x80);
    }
    put(&c, 20, 0x55);
    c.seal_now().unwrap();
    c.flush().unwrap();
    for (from, to) in [(0, 60), (3, 31), (13, 15), (18, 23), (38, 45), (0, 1)] {
        let (a, b) = (from * 4096, to * 4096);
        let what = format!("lines {from}..{to}");
        let served = check_reads(&c, &dev, a as u64, &model[a..b], &what);
        // Whole dirty lines on the cache device (or still in RAM): every cut is
        // served by the caller's own reads, unless the read holds more lines to check
        // than it hands out (a worker checks those).
        let want = if to - from <= lc_cache::URING_CHECKED_LINES {
            read_cuts(b - a).len()
        } else {
            0
        };
        assert_eq!(served, want, "{what}: start_read served");
    }
    // Sector-granular edges of a run: start and end inside lines.
    check_reads(
        &c,
        &dev,
        5 * 4096 + 1536,
        &model[5 * 4096 + 1536..9 * 4096 + 512],
        "sectors",
    );
    c.close().unwrap();
}

#[test]
fn reads_handed_out_by_start_read_are_refused_once_their_slot_was_reused() {
    // A line on the cache device is planned for the caller's own read; before the
    // caller reads, the cleaner moves it and its slot takes a newer segment. Whatever
    // the caller then read there is not that line: finish_read says so, and the full
    // read returns the line.
    let (c, mut model, dev) = cache_over_pattern(8, 0x21);
    let line = pattern(4096, 0x33);
    c.write(0, 0, &line, false).unwrap();
    model[..4096].copy_from_slice(&line);
    c.seal_now().unwrap();
    c.flush().unwrap();
    let mut buf = vec![0u8; 4096];
    let plan = c
        .start_read(0, 0, &mut [&mut buf[..]])
        .unwrap()
        .expect("a whole line on the cache device");
    let first = c.stats().open_segment_id;
    // Overwrite a few other lines over and over: their old copies go stale, the
    // cleaner moves line 0 ahead and the ring comes round to its old slot.
    let mut n = 0u8;
    while c.stats().open_segment_id < first + 3 * 8 {
        for l in 1..5u64 {
            let d = pattern(4096, n);
            c.write(0, l * 4096, &d, false).unwrap();
            model[l as usize * 4096..(l as usize + 1) * 4096].copy_from_slice(&d);
            n = n.wrapping_add(1);
        }
        c.flush().unwrap();
    }
    for r in &plan.reads {
        dev.read_at(&mut buf[r.pos..r.pos + r.len], r.device_offset)
            .unwrap();
    }
    assert!(!c.finish_read(plan, &[&buf[..]]), "the slot was reused");
    check_reads(&c, &dev, 0, &model[..8 * 4096], "after the reuse");
    c.close().unwrap();
}
