//! Crash tests. All devices (cache and backing) live in one [`CrashWorld`]; the power is
//! cut after a random number of device operations, which lands in the middle of
//! flushes, writeback, superblock commits and recovery itself. The devices are then
//! materialised as a power cut could leave them (flushed data plus any subset of
//! unflushed writes, possibly torn at sector granularity), the cache is reopened, and
//! every sector must read either its last durable value or a value written later —
//! never older data, never garbage. Reads of whole lines (and the full reads after each
//! recovery) promote misses into the cache as clean lines, so cuts land in their
//! appends, writeback and cleaning too; a clean line after a crash is gone or equal to
//! the backing device, never stale. Requests often continue where the device's last one
//! ended, so writes past `sequential_cutoff` go around the cache to the backing device.

mod common;

use std::sync::Arc;

use common::*;
use lc_cache::testing::CrashWorld;
use lc_cache::{format_device, Backing, BlockDevice, Cache, FormatOptions, OpenOptions};
use rand::rngs::SmallRng;
use rand::Rng;

const SEG: u64 = 64 << 10;

/// Per backing sector: every value it may have held (write serials, 0 = zeros) in
/// order, and the index of the last durable one.
struct Model {
    hist: Vec<Vec<Vec<u64>>>,
    durable: Vec<Vec<usize>>,
    /// The index of the value of the last write (or discard) that succeeded: live
    /// reads return it or a later one (a failed write may have taken effect in part).
    live: Vec<Vec<usize>>,
    serial: u64,
}

impl Model {
    fn new(ndev: usize, sectors: usize) -> Self {
        Model {
            hist: vec![vec![vec![0]; sectors]; ndev],
            durable: vec![vec![0; sectors]; ndev],
            live: vec![vec![0; sectors]; ndev],
            serial: 0,
        }
    }

    /// A flush succeeded: the value of each sector's last successful write is durable
    /// (a failed write's value may be, or not).
    fn flushed(&mut self) {
        for (l, d) in self.live.iter().zip(self.durable.iter_mut()) {
            for (ls, ds) in l.iter().zip(d.iter_mut()) {
                *ds = (*ds).max(*ls);
            }
        }
    }

    /// After a successful recovery the values read are the new durable baseline.
    fn rebase(&mut self, dev: usize, sector: usize, serial: u64) {
        self.hist[dev][sector] = vec![serial];
        self.durable[dev][sector] = 0;
        self.live[dev][sector] = 0;
    }

    fn check(&self, dev: usize, sector: usize, got: Option<u64>) -> Result<(), String> {
        let h = &self.hist[dev][sector];
        let d = self.durable[dev][sector];
        match got {
            None => Err(format!(
                "dev {dev} sector {sector}: garbage (history {h:?}, durable idx {d})"
            )),
            Some(s) if h[d..].contains(&s) => Ok(()),
            Some(s) => Err(format!(
                "dev {dev} sector {sector}: read serial {s}, allowed {:?} (history {h:?})",
                &h[d..]
            )),
        }
    }
}

struct Setup {
    ndev: usize,
    backing_size: u64,
    block: u64,
}

fn open_in(
    world: &CrashWorld,
    images: Vec<Vec<u8>>,
    setup: &Setup,
    rng: &mut SmallRng,
) -> Result<(Cache, lc_cache::RecoveryReport), String> {
    let mut devs: Vec<Arc<dyn BlockDevice>> = Vec::new();
    for (i, img) in images.into_iter().enumerate() {
        devs.push(world.add(&format!("dev{i}"), img));
    }
    let cache = devs.remove(0);
    let backing: Vec<Backing> = backings(&devs);
    assert_eq!(backing.len(), setup.ndev);
    Cache::open(
        cache,
        backing,
        OpenOptions {
            ram_bytes: rng.gen_range(2..4) * SEG,
            tunables: random_tunables(rng),
            ..Default::default()
        },
    )
    .map(|(c, r)| {
        if std::env::var("LC_DEBUG").is_ok() {
            eprintln!("recovery report: {r:?}");
        }
        (c, r)
    })
    .map_err(|e| e.to_string())
}

/// Runs random I/O until the power is cut; updates the model as operations complete.
/// `reads`: a mix heavy in reads (promotions), discards and drains (backing data that
/// changes under promoted lines).
fn workload(
    c: &Cache,
    world: &CrashWorld,
    m: &mut Model,
    setup: &Setup,
    rng: &mut SmallRng,
    max_ops: usize,
    reads: bool,
) {
    let blocks_total = setup.backing_size / setup.block;
    // Where the last request of each device ended: requests often continue there, so
    // sequential streams pass `sequential_cutoff` (writes go around the cache).
    let mut ends = vec![0u64; setup.ndev];
    for _ in 0..max_ops {
        if world.is_cut() {
            return;
        }
        let dev = rng.gen_range(0..setup.ndev);
        let blocks = rng.gen_range(1..=blocks_total.min(6));
        let start = request_start(rng, &mut ends[dev], blocks, blocks_total);
        let (off, len) = (start * setup.block, blocks * setup.block);
        let s0 = (off / 512) as usize;
        let ns = (len / 512) as usize;
        let op = match rng.gen_range(0..100) {
            r if !reads => r,
            0..=29 => 0,   // write
            30..=39 => 70, // flush
            40..=54 => 85, // discard
            55..=89 => 93, // read
            90..=94 => 96, // seal
            _ => 99,       // drain
        };
        match op {
            0..=69 => {
                m.serial += 1;
                let serial = m.serial;
                let mut data = vec![0u8; len as usize];
                for i in 0..ns {
                    tagged_sector(
                        serial,
                        dev as u8,
                        (s0 + i) as u64,
                        &mut data[i * 512..(i + 1) * 512],
                    );
                    m.hist[dev][s0 + i].push(serial);
                }
                let fua = rng.gen_bool(0.15);
                // Plain writes also take the daemon's non-blocking path first.
                let inline = !fua && rng.gen_bool(0.5);
                let ok = match inline.then(|| c.try_write(dev as u8, off, &data)).flatten() {
                    Some(r) => r.is_ok(),
                    None => c.write(dev as u8, off, &data, fua).is_ok(),
                };
                for i in 0..ns {
                    let last = m.hist[dev][s0 + i].len() - 1;
                    if ok {
                        m.live[dev][s0 + i] = last;
                    }
                    if ok && fua {
                        m.durable[dev][s0 + i] = last;
                    }
                }
            }
            70..=84 => {
                let r = c.flush();
                if r.is_ok() {
                    m.flushed();
                }
            }
            85..=92 => {
                for i in 0..ns {
                    m.hist[dev][s0 + i].push(0);
                }
                if c.discard(dev as u8, off, len).is_ok() {
                    for i in 0..ns {
                        m.live[dev][s0 + i] = m.hist[dev][s0 + i].len() - 1;
                    }
                }
            }
            93..=95 => {
                // Half of the reads are of whole lines: misses are promoted.
                let (s0, ns, off, len) = if rng.gen_bool(0.5) {
                    let lines = setup.backing_size / 4096;
                    let n = rng.gen_range(1..=lines.min(4));
                    let off = rng.gen_range(0..=lines - n) * 4096;
                    ((off / 512) as usize, (n * 8) as usize, off, n * 4096)
                } else {
                    (s0, ns, off, len)
                };
                let mut buf = vec![0u8; len as usize];
                let ok = match rng
                    .gen_bool(0.5)
                    .then(|| c.try_read(dev as u8, off, &mut buf))
                    .flatten()
                {
                    Some(r) => r.is_ok(),
                    None => c.read(dev as u8, off, &mut buf).is_ok(),
                };
                if ok && !world.is_cut() {
                    // Before the cut reads must see the newest value.
                    for i in 0..ns {
                        let got =
                            decode_sector(dev as u8, (s0 + i) as u64, &buf[i * 512..(i + 1) * 512]);
                        let h = &m.hist[dev][s0 + i];
                        assert!(
                            got.is_some_and(|g| h[m.live[dev][s0 + i]..].contains(&g)),
                            "live read dev {dev} sector {}: {got:?}, history {h:?}",
                            s0 + i
                        );
                    }
                }
            }
            96..=97 => {
                let _ = c.seal_now();
            }
            _ => {
                let _ = c.drain(dev as u8, &mut |_| {});
            }
        }
    }
}

/// Reopens after a crash (retrying when the power is cut during recovery itself) and
/// checks every sector against the model; then rebases the model on what was read.
fn recover_and_check(
    images: Vec<Vec<u8>>,
    m: &mut Model,
    setup: &Setup,
    rng: &mut SmallRng,
    ctx: &str,
) -> (CrashWorld, Cache) {
    let mut images = images;
    loop {
        let world = CrashWorld::new();
        // Sometimes cut the power during recovery.
        let cut_in_recovery = rng.gen_bool(0.2);
        if cut_in_recovery {
            world.cut_after(rng.gen_range(0..6));
        }
        let opened = open_in(&world, images.clone(), setup, rng);
        if cut_in_recovery {
            // The cut lands in recovery or just after it; either way, crash again.
            world.cut_now();
        }
        match opened {
            Ok((c, report)) if !world.is_cut() => {
                let ctx = format!("{ctx}: {report:?}");
                for dev in 0..setup.ndev {
                    for (s, got) in read_all(&c, dev, setup)
                        .unwrap_or_else(|e| panic!("{ctx}: read after recovery: {e}"))
                        .into_iter()
                        .enumerate()
                    {
                        if let Err(e) = m.check(dev, s, got) {
                            panic!("{ctx}: {e}");
                        }
                        m.rebase(dev, s, got.expect("checked"));
                    }
                }
                return (world, c);
            }
            Ok((c, _)) => {
                drop(c);
                images = world.crash_images(rng);
            }
            Err(e) if cut_in_recovery => {
                assert!(e.contains("power cut"), "{ctx}: recovery failed: {e}");
                images = world.crash_images(rng);
            }
            Err(e) => panic!("{ctx}: recovery failed: {e}"),
        }
    }
}

/// What each sector of device `dev` reads: its serial, [`LOST`] when the read fails as
/// lost (block by block then), `None` for garbage.
fn read_all(c: &Cache, dev: usize, setup: &Setup) -> lc_cache::Result<Vec<Option<u64>>> {
    let sectors = (setup.backing_size / 512) as usize;
    let decode = |buf: &[u8], s0: usize| {
        (0..buf.len() / 512)
            .map(|i| decode_sector(dev as u8, (s0 + i) as u64, &buf[i * 512..(i + 1) * 512]))
            .collect::<Vec<_>>()
    };
    let mut buf = vec![0u8; setup.backing_size as usize];
    match c.read(dev as u8, 0, &mut buf) {
        Ok(()) => return Ok(decode(&buf, 0)),
        Err(lc_cache::Error::Lost { .. }) => {}
        Err(e) => return Err(e),
    }
    let per = (setup.block / 512) as usize;
    let mut got = Vec::with_capacity(sectors);
    for s0 in (0..sectors).step_by(per) {
        let b = &mut buf[..setup.block as usize];
        match c.read(dev as u8, s0 as u64 * 512, b) {
            Ok(()) => got.extend(decode(b, s0)),
            Err(lc_cache::Error::Lost { .. }) => got.extend(std::iter::repeat_n(Some(LOST), per)),
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

/// The "value" of a sector whose data was lost to media damage: its reads fail.
const LOST: u64 = u64::MAX;

/// A random setup and a cache of 3..8 slots (at least `min_slots`) formatted in a new
/// world (format `version`, or 1 and 2 at random), opened and checked: the setup, its
/// model, the world and the cache.
fn fresh_case(
    rng: &mut SmallRng,
    min_slots: u64,
    version: Option<u32>,
    ctx: &str,
) -> (Setup, Model, CrashWorld, Cache) {
    let block = if rng.gen_bool(0.5) { 512u32 } else { 4096 };
    let setup = Setup {
        ndev: rng.gen_range(1..=2),
        backing_size: rng.gen_range(8..32u64) * 4096,
        block: block as u64,
    };
    let slots = rng.gen_range(min_slots..8u64);
    let world = CrashWorld::new();
    let cache = world.add("cache", vec![0u8; (SEG * (slots + 1)) as usize]);
    let version = version.unwrap_or_else(|| if rng.gen_bool(0.25) { 1 } else { 2 });
    format_device(
        cache.as_ref(),
        FormatOptions {
            block_size: block,
            segment_size: SEG as u32,
            version,
        },
    )
    .unwrap();
    let mut images = vec![world.crash_images(rng).remove(0)];
    for _ in 0..setup.ndev {
        images.push(vec![0u8; setup.backing_size as usize]);
    }
    let mut m = Model::new(setup.ndev, (setup.backing_size / 512) as usize);
    let (world, c) = recover_and_check(images, &mut m, &setup, rng, ctx);
    (setup, m, world, c)
}

/// Runs one case (`reads`: the read-heavy mix); returns the lines the cleaner moved,
/// the lines promoted and the bytes written around the cache.
fn run_case(seed: u64, reads: bool) -> (u64, u64, u64) {
    let mut rng = rng(seed);
    // Format 1 caches still open, serve and write back: crash them too.
    let (setup, mut m, mut world, mut c) =
        fresh_case(&mut rng, 3, None, &format!("seed {seed} initial"));
    let (mut moved, mut promoted, mut bypassed) = (0, 0, 0);
    for round in 0..3 {
        let ctx = format!("seed {seed} round {round}");
        world.cut_after(rng.gen_range(0..400));
        workload(&c, &world, &mut m, &setup, &mut rng, 300, reads);
        world.cut_now();
        moved += c.stats().moved_lines;
        promoted += c.stats().promoted_lines;
        bypassed += c.stats().bypassed_bytes;
        drop(c);
        let images = world.crash_images(&mut rng);
        (world, c) = recover_and_check(images, &mut m, &setup, &mut rng, &ctx);
    }
    // Last: a power cut, then media damage in a segment the log proves durable.
    world.cut_after(rng.gen_range(0..400));
    workload(&c, &world, &mut m, &setup, &mut rng, 300, reads);
    world.cut_now();
    drop(c);
    let mut images = world.crash_images(&mut rng);
    let ctx = format!("seed {seed} damage");
    if let Some((id, off)) = byte_of_a_durable_segment(&images[0], &mut rng) {
        images[0][off] ^= 1 << rng.gen_range(0..8);
        let ctx = format!("{ctx} (segment {id}, byte {off})");
        check_after_damage(images, &m, &setup, &mut rng, &ctx);
    }
    (moved, promoted, bypassed)
}

/// The newest sound superblock of cache image `img`, and the last segment the image
/// proves durable (the superblock's `durable_id` or a later header's claim).
fn proven_log(img: &[u8]) -> Option<(lc_cache::format::Superblock, u64)> {
    use lc_cache::format::{Superblock, SB_COPY_SIZE};
    let sb = (0..2)
        .filter_map(|i| {
            Superblock::decode(&img[i * SB_COPY_SIZE..(i + 1) * SB_COPY_SIZE], "c").ok()
        })
        .max_by_key(|sb| sb.seq)?;
    let (g, w) = (sb.geometry, sb.last_writeback_id);
    let proven = (w + 1..=w + g.nr_segments)
        .filter_map(|id| header_in(img, &sb, id).map(|h| h.durable))
        .fold(sb.durable_id, u64::max);
    Some((sb, proven))
}

/// Segment `id`'s newest header in cache image `img`.
fn header_in(
    img: &[u8],
    sb: &lc_cache::format::Superblock,
    id: u64,
) -> Option<lc_cache::format::SegmentHeader> {
    let g = &sb.geometry;
    let off = g.segment_offset(id) as usize;
    lc_cache::format::newest_header(&img[off..off + g.data_start()], g, id, &sb.uuid)
        .map(|(h, _)| h)
}

/// A random byte of a segment that the image proves durable (the superblock's
/// `durable_id` or a later header's claim covers it): damage there is not a torn tail.
/// Returns the segment id and the byte's offset in the image.
fn byte_of_a_durable_segment(img: &[u8], rng: &mut SmallRng) -> Option<(u64, usize)> {
    use lc_cache::format::CheckpointHeader;
    let (sb, proven) = proven_log(img)?;
    let (g, w) = (sb.geometry, sb.last_writeback_id);
    let header = |id: u64| header_in(img, &sb, id);
    // Segments a checkpoint covers are not re-read by recovery (FORMAT.md,
    // "Checkpoint"): damage there is not detected by it. Damage only segments after it.
    let areas = if g.version >= 2 { 0..2u64 } else { 0..0 };
    let covered = areas
        .filter_map(|a| {
            let off = g.checkpoint_offset(a) as usize;
            CheckpointHeader::decode(&img[off..off + 4096], &g, &sb.uuid, a).ok()
        })
        .map(|h| h.upto)
        .fold(w, u64::max);
    if proven <= covered {
        return None;
    }
    let id = rng.gen_range(covered + 1..=proven);
    let Some(h) = header(id) else {
        // Its headers are gone already (an earlier flip): any header byte.
        return Some((
            id,
            g.segment_offset(id) as usize + rng.gen_range(0..g.data_start()),
        ));
    };
    // The newest header's copy, or one of its lines.
    let copy = g.header_copy(h.gen);
    let at = if h.entries.is_empty() || rng.gen_bool(0.3) {
        copy * g.header_len() + rng.gen_range(0..g.header_len())
    } else {
        g.data_start() + rng.gen_range(0..h.entries.len() * 4096)
    };
    Some((id, g.segment_offset(id) as usize + at))
}

/// Reopens a damaged image: every sector reads its last durable value or a later one,
/// or fails as lost — never older data.
fn check_after_damage(
    images: Vec<Vec<u8>>,
    m: &Model,
    setup: &Setup,
    rng: &mut SmallRng,
    ctx: &str,
) {
    let world = CrashWorld::new();
    let (c, report) = open_in(&world, images, setup, rng)
        .unwrap_or_else(|e| panic!("{ctx}: recovery failed: {e}"));
    let ctx = format!("{ctx}: {report:?}");
    let per = (setup.block / 512) as usize;
    let mut buf = vec![0u8; setup.block as usize];
    for dev in 0..setup.ndev {
        for b in 0..(setup.backing_size / setup.block) as usize {
            match c.read(dev as u8, b as u64 * setup.block, &mut buf) {
                Ok(()) => {
                    for i in 0..per {
                        let s = b * per + i;
                        let got = decode_sector(dev as u8, s as u64, &buf[i * 512..(i + 1) * 512]);
                        if let Err(e) = m.check(dev, s, got) {
                            panic!("{ctx}: {e}");
                        }
                    }
                }
                Err(lc_cache::Error::Lost { .. }) => {}
                Err(e) => panic!("{ctx}: read after damage: {e}"),
            }
        }
    }
}

#[test]
fn acknowledged_writes_survive_power_cuts_at_random_points() {
    let base = seed("crash");
    let (mut moved, mut promoted, mut bypassed) = (0, 0, 0);
    for i in 0..cases(300) as u64 {
        let (m, p, b) = run_case(base.wrapping_add(i), false);
        moved += m;
        promoted += p;
        bypassed += b;
    }
    // The power cuts must also land in the cleaner's moves and releases, in
    // promotions of read misses and in writes around the cache.
    eprintln!(
        "lines moved by the cleaner: {moved}, promoted by reads: {promoted}, bytes written around: {bypassed}"
    );
    assert!(moved > 0, "the cleaner never ran");
    assert!(promoted > 0, "no read miss was promoted");
    assert!(bypassed > 0, "no write went around the cache");
}

#[test]
fn promoted_lines_after_power_cuts_are_gone_or_equal_to_the_backing_device() {
    // Whole-line reads promote misses while writes, writeback (drains) and discards
    // change the backing data under them; every read before and after each cut is
    // checked against the model, so a stale clean line shows as older data.
    let base = seed("crash-promote");
    let mut promoted = 0;
    for i in 0..cases(300) as u64 / 3 {
        promoted += run_case(base.wrapping_add(i), true).1;
    }
    eprintln!("lines promoted by reads: {promoted}");
    assert!(promoted > 0, "no read miss was promoted");
}

/// Loss records (FORMAT.md, "Loss records"): a line found rotten while serving stays
/// lost across power cuts at random points (in the checkpoints that record it, the
/// appends, cleaning and writeback after it, recovery itself) until a rewrite of it is
/// durable, and never reads its older data. The flip goes into a line of the cache
/// device (durably), a full read finds it; the model then holds [`LOST`] as the
/// sectors' durable value. The rounds after it read too (read misses are promoted
/// beside the loss, which must never make a lost line readable).
#[test]
fn losses_found_while_serving_survive_power_cuts() {
    let base = seed("crash-loss");
    let mut found = 0;
    for i in 0..cases(300) as u64 / 3 {
        found += loss_case(base.wrapping_add(i));
    }
    eprintln!("cases with lost sectors: {found}");
    assert!(found > 0, "no flip was ever found");
}

/// One case of [`losses_found_while_serving_survive_power_cuts`]: 1 when a loss was
/// found.
fn loss_case(seed: u64) -> u64 {
    let mut rng = rng(seed);
    let ctx = format!("seed {seed}");
    let (setup, mut m, world, c) = fresh_case(&mut rng, 4, Some(2), &ctx);
    workload(&c, &world, &mut m, &setup, &mut rng, 200, false);
    if c.flush().is_err() {
        return 0;
    }
    m.flushed();
    // A checkpoint covering the log, or not: the rot is found while serving (a read
    // checks the line against its crc), or by recovery's walk.
    if rng.gen_bool(0.5) {
        c.checkpoint().unwrap();
    }
    world.cut_now();
    drop(c);
    let images = world.crash_images(&mut rng);
    // Rot a line of a segment, until a read finds a loss (a stale line's rot harms
    // nothing).
    let mut opened = None;
    for attempt in 0..8 {
        let mut imgs = images.clone();
        let Some((off, dev, s0)) = a_line_byte(&imgs[0], &mut rng) else {
            return 0;
        };
        imgs[0][off] ^= 1 << rng.gen_range(0..8);
        let world = CrashWorld::new();
        let (c, report) = open_in(&world, imgs, &setup, &mut rng)
            .unwrap_or_else(|e| panic!("{ctx}: recovery failed: {e}"));
        let ctx = format!("{ctx} flip {attempt} at {off}: {report:?}");
        let mut m2 = Model {
            hist: m.hist.clone(),
            durable: m.durable.clone(),
            live: m.live.clone(),
            serial: m.serial,
        };
        let mut lost = 0;
        for d in 0..setup.ndev {
            let got = read_all(&c, d, &setup).unwrap_or_else(|e| panic!("{ctx}: {e}"));
            for (s, got) in got.into_iter().enumerate() {
                if got == Some(LOST) {
                    // Only the flipped line's sectors.
                    assert!(
                        d == dev as usize && (s0..s0 + 8).contains(&(s as u64)),
                        "{ctx}: dev {d} sector {s} lost"
                    );
                    lost += 1;
                } else if let Err(e) = m2.check(d, s, got) {
                    panic!("{ctx}: {e}");
                }
                m2.rebase(d, s, got.expect("checked"));
            }
        }
        if lost > 0 {
            m = m2;
            opened = Some((world, c));
            break;
        }
    }
    let Some((mut world, mut c)) = opened else {
        return 0;
    };
    for round in 0..3 {
        let ctx = format!("seed {seed} loss round {round}");
        world.cut_after(rng.gen_range(0..400));
        workload(&c, &world, &mut m, &setup, &mut rng, 300, true);
        world.cut_now();
        drop(c);
        let images = world.crash_images(&mut rng);
        (world, c) = recover_and_check(images, &mut m, &setup, &mut rng, &ctx);
    }
    1
}

/// A random byte of a line of a segment the image holds and proves durable (its newest
/// header lists the line): its offset, and the line's backing device and first sector; `None` when no
/// segment holds one.
fn a_line_byte(img: &[u8], rng: &mut SmallRng) -> Option<(usize, u8, u64)> {
    // Damage in a segment nothing proves durable is a torn tail (FORMAT.md, "Why the
    // proof is sound, and its one gap").
    let (sb, proven) = proven_log(img)?;
    let g = sb.geometry;
    let held: Vec<(u64, lc_cache::format::SegmentHeader)> = (sb.last_writeback_id + 1..=proven)
        .filter_map(|id| header_in(img, &sb, id).map(|h| (id, h)))
        .filter(|(_, h)| !h.entries.is_empty())
        .collect();
    let (id, h) = held.get(rng.gen_range(0..held.len().max(1)))?;
    let slot = rng.gen_range(0..h.entries.len());
    let e = &h.entries[slot];
    let off =
        g.segment_offset(*id) as usize + g.data_start() + slot * 4096 + rng.gen_range(0..4096);
    Some((off, e.dev, e.sector))
}
