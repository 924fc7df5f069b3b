//! Corruption tests: random bytes flipped in the superblock, segment headers and cache
//! lines. Opening then either recovers a valid prefix of the log (every sector reads a
//! value that was written to it, never a damaged one) or refuses with a clear error;
//! it never panics.

mod common;

use std::sync::Arc;

use common::*;
use lc_cache::format::{Geometry, SB_COPY_SIZE};
use lc_cache::{BlockDevice, Cache, MemDevice, OpenOptions, Tunables};
use rand::Rng;

const SEG: u32 = 64 << 10;
const BACKING: u64 = 256 << 10;

/// Builds a cache whose log holds several segments of dirty data (writeback off) and
/// returns the cache image, the backing image and every sector's history.
fn build(seed: u64) -> (Vec<u8>, Vec<u8>, Vec<Vec<u64>>) {
    let mut rng = rng(seed);
    let cache = mem_cache(SEG as u64 * 12, 512, SEG);
    let backing: Arc<dyn BlockDevice> = Arc::new(MemDevice::new(BACKING));
    let t = Tunables {
        writeback_enabled: false,
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
    let cdev: Arc<dyn BlockDevice> = Arc::new(MemDevice::from_bytes(cache, "cache"));
    let bdev: Arc<dyn BlockDevice> = Arc::new(MemDevice::from_bytes(backing.to_vec(), "backing"));
    let (c, r) = Cache::open(
        cdev,
        backings(std::slice::from_ref(&bdev)),
        OpenOptions::default(),
    )?;
    Ok((c, r, bdev))
}

fn check_reads(c: &Cache, hist: &[Vec<u64>], exact: bool, ctx: &str) {
    let mut buf = vec![0u8; BACKING as usize];
    c.read(0, 0, &mut buf).unwrap();
    for (s, h) in hist.iter().enumerate() {
        let got = decode_sector(0, s as u64, &buf[s * 512..(s + 1) * 512]);
        let ok = match got {
            Some(v) if exact => v == *h.last().unwrap(),
            Some(v) => h.contains(&v),
            None => false,
        };
        assert!(ok, "{ctx}: sector {s} read {got:?}, history {h:?}");
    }
}

#[test]
fn clean_image_recovers_every_write() {
    let (img, back, hist) = build(seed("corruption-clean"));
    let (c, r, _) = open_image(img, &back).unwrap();
    assert!(r.replayed_segments > 3, "{r:?}");
    assert_eq!(r.stop_reason, None);
    check_reads(&c, &hist, true, "clean");
}

#[test]
fn flipped_bytes_in_log_recover_a_valid_prefix_or_refuse() {
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
                detected += r.stop_reason.is_some() as usize;
                check_reads(&c, &hist, r.stop_reason.is_none(), &ctx);
            }
            Err(e) => panic!("{ctx}: a damaged segment must not stop the cache opening: {e}"),
        }
    }
    assert!(detected > 0, "no flip was ever detected");
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
    // Version 2 with a valid checksum in both copies.
    for copy in 0..2 {
        let o = copy * SB_COPY_SIZE;
        img[o + 8..o + 12].copy_from_slice(&2u32.to_le_bytes());
        let c = crc32c::crc32c(&img[o..o + SB_COPY_SIZE - 4]);
        img[o + SB_COPY_SIZE - 4..o + SB_COPY_SIZE].copy_from_slice(&c.to_le_bytes());
    }
    let e = open_image(img, &b).err().unwrap();
    assert!(e.to_string().contains("version 2"), "{e}");
}
