//! Formatting a cache device, reading its superblock, and replaying its log after
//! `last_writeback_id` into an index ([`replay`], which `Cache::open` and
//! [`check_device`] share).
//!
//! Replay walks ids `wb+1, wb+2, ...` and stops at the first segment that fails any
//! check: header magic and crc32c, cache uuid, id and lap matching the slot, the chain
//! (`prev_crc` equals the crc of the previous replayed header), entry sanity, and the
//! crc32c of the line data. Nothing after a failed segment is trusted. Recovery itself
//! writes nothing, so a crash during recovery leaves the device as it was.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::damage::Damage;
use crate::device::{AlignedBuf, BlockDevice};
use crate::error::{Error, Result};
use crate::format::{
    decode_lost_record, CheckpointHeader, Geometry, SegmentHeader, Superblock, CP_ENTRY, CP_HEADER,
    FULL_LINE, LINE, MAX_BACKING, SB_COPY_SIZE, SEAL_AHEAD,
};
use crate::index::{Index, Loc};
use crate::readahead::{ReadAhead, Slot};

/// Options for [`format_device`].
#[derive(Clone, Copy, Debug)]
pub struct FormatOptions {
    /// Logical block size, 512 or 4096.
    pub block_size: u32,
    /// Segment size, a power of two from 64 KiB to 4 MiB.
    pub segment_size: u32,
    /// Format version: [`FORMAT_VERSION`](crate::format::FORMAT_VERSION) (2), or 1 to
    /// make a cache an older build can open.
    pub version: u32,
}

impl Default for FormatOptions {
    fn default() -> Self {
        FormatOptions {
            block_size: 512,
            segment_size: 1 << 20,
            version: crate::format::FORMAT_VERSION,
        }
    }
}

/// What [`Cache::open`] found on the device.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    /// `last_writeback_id` from the superblock.
    pub last_writeback_id: u64,
    /// Segments replayed.
    pub replayed_segments: u64,
    /// Dirty lines (and discard records) restored into the index.
    pub restored_lines: u64,
    /// Where and why the log ended, when it ended at a segment that failed a check
    /// (a torn tail: written but never made durable, so nothing acknowledged is lost)
    /// rather than at a slot holding no segment of this log.
    pub tail: Option<String>,
    /// Damaged segments: ids that failed a check although a later segment proves they
    /// were durable, with the reason. Their data is lost ([`crate::damage::DamageReport`]).
    pub damaged: Vec<(u64, String)>,
    /// The checkpoint recovery started from (format 2), if any.
    pub checkpoint: Option<CheckpointUse>,
    /// Checkpoint areas not used, and why (a torn or damaged area, one of another
    /// cache, one whose segments were all written back since).
    pub checkpoint_skipped: Vec<String>,
    /// The loss records recovery started from: (checkpoint seq, lines with lost
    /// sectors), when the checkpoint used held any (docs/FORMAT.md, "Loss records").
    pub loss_records: Option<(u64, u64)>,
    /// Time spent loading checkpoints (reading them and building the index).
    pub checkpoint_time: Duration,
    /// Time spent walking the log after the checkpoint (or the whole log).
    pub walk_time: Duration,
}

/// The checkpoint a recovery loaded (docs/FORMAT.md, "Checkpoint").
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CheckpointUse {
    /// Its sequence number (area `seq % 2`).
    pub seq: u64,
    /// The last segment it covers: the walk started after it.
    pub upto: u64,
    /// The writeback point recorded in it.
    pub last_writeback_id: u64,
    /// Entries it held, and those loaded (not written back since).
    pub entries: u64,
    /// Entries loaded into the index.
    pub loaded: u64,
}

pub(crate) fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(Instant::now().elapsed().as_nanos());
    h.write_u32(std::process::id());
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    h.write_u128(t);
    h.finish()
}

fn random_uuid() -> [u8; 16] {
    let mut u = [0u8; 16];
    u[..8].copy_from_slice(&random_u64().to_le_bytes());
    u[8..].copy_from_slice(&random_u64().to_le_bytes());
    u
}

/// Formats `dev` as an empty cache; returns its geometry. Any data on it is lost.
pub fn format_device(dev: &dyn BlockDevice, opts: FormatOptions) -> Result<Geometry> {
    let geo = Geometry::with_version(opts.version, opts.block_size, opts.segment_size, dev.size())?;
    let uuid = random_uuid();
    let desc = dev.describe();
    for seq in [0u64, 1] {
        let sb = Superblock {
            geometry: geo,
            uuid,
            seq,
            last_writeback_id: 0,
            durable_id: 0,
            // Segment 1 of a fresh log chains to 0.
            last_writeback_crc: Some(0),
            backing: vec![None; MAX_BACKING],
        };
        let off = Superblock::copy_offset(seq);
        dev.write_at(&sb.encode(), off)
            .map_err(|e| Error::io(&desc, off, e))?;
    }
    // No checkpoint area header of an earlier format of this device may be read as one.
    for area in 0..2 {
        if geo.appends() {
            let off = geo.checkpoint_offset(area);
            dev.write_at(&AlignedBuf::new(CP_HEADER), off)
                .map_err(|e| Error::io(&desc, off, e))?;
        }
    }
    dev.flush().map_err(|e| Error::io(&desc, 0, e))?;
    Ok(geo)
}

/// Reads and decodes both superblock copies: `None` when the device is too small to
/// hold them, else each copy decoded or its error, and whether either has the magic.
fn read_copies(dev: &dyn BlockDevice) -> Result<Option<(Vec<Result<Superblock>>, bool)>> {
    let desc = dev.describe();
    if dev.size() < 2 * SB_COPY_SIZE as u64 {
        return Ok(None);
    }
    let mut copies = Vec::new();
    let mut any_magic = false;
    for copy in 0..2u64 {
        let mut b = vec![0u8; SB_COPY_SIZE];
        let off = copy * SB_COPY_SIZE as u64;
        dev.read_at(&mut b, off)
            .map_err(|e| Error::io(&desc, off, e))?;
        any_magic |= b[..8] == crate::format::SB_MAGIC;
        copies.push(Superblock::decode(&b, &desc));
    }
    Ok(Some((copies, any_magic)))
}

/// Reads the newest valid superblock copy. `Ok(None)` means the device holds no lc
/// superblock at all (neither copy has the magic).
pub fn probe(dev: &dyn BlockDevice) -> Result<Option<Superblock>> {
    let Some((copies, any_magic)) = read_copies(dev)? else {
        return Ok(None);
    };
    let mut best: Option<Superblock> = None;
    let mut errors = Vec::new();
    for c in copies {
        match c {
            Ok(sb) if best.as_ref().is_none_or(|b| sb.seq > b.seq) => best = Some(sb),
            Ok(_) => {}
            Err(e) => errors.push(e),
        }
    }
    match best {
        Some(sb) => Ok(Some(sb)),
        None if !any_magic => Ok(None),
        // Prefer a version error: it tells the user what is going on.
        None => Err(errors
            .into_iter()
            .max_by_key(|e| matches!(e, Error::Version { .. }) as u8)
            .expect("an error per copy")),
    }
}

/// What replay rebuilt from the log, and its report.
pub(crate) struct Replay {
    /// The writeback point the walk started from (the superblock's, or a later one
    /// proven by a reused slot).
    pub wb_id: u64,
    pub index: Index,
    /// The last segment walked (replayed or damaged) and its header crc (0 when its
    /// header is unknown).
    pub last_id: u64,
    pub last_crc: u32,
    pub damage: Damage,
    /// Segments taken at an older append than their newest header: id -> generation.
    pub recovered_gens: BTreeMap<u64, u16>,
    /// The last segment was taken at a header that may not be its final one (a newer
    /// append torn, or a copy unreadable): nothing may claim it durable until a
    /// segment after it is (see [`State::durable_claim`](crate::state::State)).
    pub ambiguous: bool,
    /// The header crc each walked segment's successor chains to (its `prev_crc`), by
    /// segment id, up to `last_id` (whose value is `last_crc`): what a superblock
    /// recording that segment as the writeback point stores (`last_writeback_crc`).
    pub chain: BTreeMap<u64, u32>,
    /// That crc for `wb_id`, when known.
    pub wb_crc: Option<u32>,
    /// The line crcs of the segments replayed (`linecrc.rs`).
    pub line_crcs: crate::linecrc::LineCrcs,
    pub report: RecoveryReport,
    /// The newest checkpoint sequence number whose area header is valid (0: none).
    pub cp_seq: u64,
    /// The last segment the loaded checkpoint covers (0: none loaded).
    pub cp_upto: u64,
}

/// A checkpoint loaded into an index.
struct Base {
    index: Index,
    header: CheckpointHeader,
    loaded: u64,
    /// Its loss records: (line key, lost sectors).
    lost: Vec<(u64, u8)>,
}

/// Reads the header of each checkpoint area: (area, header or why not).
fn checkpoint_headers(
    dev: &dyn BlockDevice,
    sb: &Superblock,
) -> Result<Vec<(u64, std::result::Result<CheckpointHeader, String>)>> {
    let geo = &sb.geometry;
    if !geo.appends() {
        return Ok(Vec::new());
    }
    let mut out = Vec::new();
    for area in 0..2 {
        let mut b = AlignedBuf::new(CP_HEADER);
        let off = geo.checkpoint_offset(area);
        dev.read_at(&mut b, off)
            .map_err(|e| Error::io(&dev.describe(), off, e))?;
        let h = if b.iter().all(|&x| x == 0) {
            Err("never written".to_string())
        } else {
            CheckpointHeader::decode(&b, geo, &sb.uuid, area)
        };
        out.push((area, h));
    }
    Ok(out)
}

/// Bytes of checkpoint entries per read.
const CP_READ: usize = 4 << 20;
/// Checkpoint reads in flight (threads), and buffers: a device serves several reads
/// at once much faster than one after the other (a virtio disk here: 0.4 GB/s at one
/// 4 MiB read at a time, 1 GB/s at 8).
const CP_READERS: usize = 4;
const CP_BUFFERS: usize = 2 * CP_READERS;

/// A chunk of checkpoint entries read: its number, the buffer, its length in bytes and
/// its crc32c.
type CpChunk = (usize, AlignedBuf, usize, u32);

/// Loads the entries of checkpoint `h` (area `area`) whose segment is after `wb` into a
/// new index; `Err` with the reason when the area fails a check. Reader threads read
/// the area's chunks (and compute their crcs) in parallel while this one decodes and
/// inserts them in order. A reader claims the next chunk only once it holds a buffer,
/// so the chunk the decoder waits for is always being read. `chunk`: bytes per read
/// ([`CP_READ`]; a multiple of 4096).
fn load_checkpoint(
    dev: &dyn BlockDevice,
    sb: &Superblock,
    area: u64,
    h: &CheckpointHeader,
    wb: u64,
    planned: usize,
    chunk: usize,
) -> Result<std::result::Result<Base, String>> {
    debug_assert!(chunk > 0 && chunk.is_multiple_of(LINE as usize));
    let geo = &sb.geometry;
    let total = h.nr_entries as usize * CP_ENTRY;
    let chunks = total.div_ceil(chunk);
    let base = geo.checkpoint_offset(area) + CP_HEADER as u64;
    let (full_tx, full_rx) = std::sync::mpsc::sync_channel::<Result<CpChunk>>(CP_BUFFERS);
    let (empty_tx, empty_rx) = std::sync::mpsc::channel::<AlignedBuf>();
    for _ in 0..CP_BUFFERS.min(chunks) {
        let _ = empty_tx.send(AlignedBuf::new(chunk));
    }
    let empty_rx = Mutex::new(empty_rx);
    let claimed = AtomicUsize::new(0);
    std::thread::scope(|s| {
        for _ in 0..CP_READERS.min(chunks) {
            let (full_tx, empty_rx, claimed) = (full_tx.clone(), &empty_rx, &claimed);
            s.spawn(move || loop {
                // The decoder gave up (a malformed entry, a failed read) once the
                // buffers' channel is closed.
                let Ok(mut buf) = empty_rx.lock().expect("buffer pool").recv() else {
                    return;
                };
                let c = claimed.fetch_add(1, Ordering::Relaxed);
                if c >= chunks {
                    return;
                }
                let len = (total - c * chunk).min(chunk);
                let rl = (len as u64).div_ceil(LINE) as usize * LINE as usize;
                let off = base + (c * chunk) as u64;
                let r = dev
                    .read_at(&mut buf[..rl], off)
                    .map_err(|e| Error::io(&dev.describe(), off, e))
                    .map(|()| {
                        let crc = crc32c::crc32c(&buf[..len]);
                        (c, buf, len, crc)
                    });
                if full_tx.send(r).is_err() {
                    return;
                }
            });
        }
        drop(full_tx);
        // The table is allocated (and its pages touched) while the first chunks are read.
        let mut index = Index::with_capacity(planned);
        let mut bulk = index.begin_bulk(wb + 1, h.upto);
        let mut loaded = 0u64;
        let mut lost = Vec::with_capacity(h.nr_lost as usize);
        let mut crc = 0u32;
        let mut early: BTreeMap<usize, (AlignedBuf, usize, u32)> = BTreeMap::new();
        let mut malformed = None;
        let mut failed = None;
        'chunks: for next in 0..chunks {
            let (buf, len, chunk_crc) = loop {
                if let Some(c) = early.remove(&next) {
                    break c;
                }
                match full_rx.recv() {
                    Ok(Ok((c, buf, len, crc))) => {
                        early.insert(c, (buf, len, crc));
                    }
                    Ok(Err(e)) => {
                        failed = Some(e);
                        break 'chunks;
                    }
                    // Every reader ended before this chunk: cannot happen while the
                    // buffers' channel is open, but not a reason to hang.
                    Err(_) => {
                        failed = Some(Error::Invalid(format!(
                            "checkpoint {}: chunk {next} never read",
                            h.seq
                        )));
                        break 'chunks;
                    }
                }
            };
            crc = crc32c::crc32c_combine(crc, chunk_crc, len);
            for (i, e) in buf[..len].chunks_exact(CP_ENTRY).enumerate() {
                let k = u64::from_le_bytes(e[..8].try_into().expect("8 bytes"));
                let v = u64::from_le_bytes(e[8..].try_into().expect("8 bytes"));
                let n = next * chunk / CP_ENTRY + i;
                // The last `nr_lost` entries are loss records, the others line copies.
                if (n as u64) >= h.nr_entries - h.nr_lost {
                    match decode_lost_record(v, h.upto) {
                        Some(bits) if (crate::index::unkey(k).0 as usize) < MAX_BACKING => {
                            lost.push((k, bits));
                            continue;
                        }
                        _ => {
                            malformed = Some(n);
                            break 'chunks;
                        }
                    }
                }
                let loc = Loc::unpack(v);
                let sound = loc.pack() == v
                    && (crate::index::unkey(k).0 as usize) < MAX_BACKING
                    && loc.seg > h.last_writeback_id
                    && loc.seg <= h.upto
                    && (loc.slot as u32) < geo.lines_per_segment
                    && (loc.dirty == 0) == loc.tomb
                    && !(loc.clean && (loc.tomb || loc.dirty != FULL_LINE));
                if !sound {
                    malformed = Some(n);
                    break 'chunks;
                }
                if loc.seg > wb {
                    index.bulk_insert(&mut bulk, k, loc);
                    loaded += 1;
                }
            }
            let _ = empty_tx.send(buf);
        }
        // Ends the readers still going (a malformed entry, a failed read).
        drop(empty_tx);
        drop(full_rx);
        // A malformed entry is reported as such even when a reader, ahead, failed.
        if let Some(n) = malformed {
            return Ok(Err(format!("checkpoint {} entry {n} malformed", h.seq)));
        }
        if let Some(e) = failed {
            return Err(e);
        }
        if crc != h.entries_crc {
            return Ok(Err(format!(
                "checkpoint {} entries checksum mismatch",
                h.seq
            )));
        }
        index.finish_bulk(bulk);
        Ok(Ok(Base {
            index,
            header: h.clone(),
            loaded,
            lost,
        }))
    })
}

/// The writeback point proven by reused slots: while the slot of `wb + 1` holds a
/// segment of a later lap, `wb` becomes that id minus `nr_segments` (FORMAT.md,
/// "Recovery" step 2).
fn proven_writeback(dev: &dyn BlockDevice, sb: &Superblock, mut wb: u64) -> Result<u64> {
    let geo = &sb.geometry;
    let mut buf = AlignedBuf::new(geo.data_start());
    loop {
        let id = wb + 1;
        let off = geo.segment_offset(id);
        dev.read_at(&mut buf, off)
            .map_err(|e| Error::io(&dev.describe(), off, e))?;
        let reused = crate::format::decode_copies(&buf, geo)
            .into_iter()
            .flatten()
            .find_map(|(h, _)| {
                (h.uuid == sb.uuid && h.id > id && (h.id - id).is_multiple_of(geo.nr_segments))
                    .then(|| h.id - geo.nr_segments)
            });
        match reused {
            Some(p) if p > wb => wb = p,
            _ => return Ok(wb),
        }
    }
}

/// The durability claims (`SegmentHeader::durable`) of the segments ahead of the walk:
/// read lazily, only once the walk meets a segment that fails its checks.
struct Claims {
    /// Highest claim seen.
    max: u64,
    /// Slots read so far: ids up to this one.
    scanned_to: u64,
}

impl Claims {
    /// True when some valid segment after `id` (within `2 * SEAL_AHEAD` of it and
    /// inside the ring window ending at `window_end`) says `id` was durable.
    fn cover(
        &mut self,
        dev: &dyn BlockDevice,
        sb: &Superblock,
        ahead: &mut ReadAhead,
        id: u64,
        window_end: u64,
    ) -> Result<bool> {
        let end = window_end.min(id + 2 * SEAL_AHEAD);
        self.scanned_to = self.scanned_to.max(id);
        while self.max < id && self.scanned_to < end {
            self.scanned_to += 1;
            let claim = match ahead.claim(self.scanned_to) {
                Some(c) => c,
                None => header_of(dev, sb, self.scanned_to)?.map_or(0, |h| h.0.durable),
            };
            self.max = self.max.max(claim);
        }
        Ok(self.max >= id)
    }
}

/// A segment the walk could not take.
struct Bad {
    /// Its header with its crc, when the header itself is sound and of this slot.
    header: Option<(SegmentHeader, u32)>,
    reason: String,
    /// The slot holds no segment of this log at all (never written since format, or
    /// left from an earlier lap): the normal end of a log.
    foreign: bool,
    /// The segment's own headers prove it held durable lines.
    proven: bool,
    /// The crc of its other, older header, when that one is sound too.
    older_crc: Option<u32>,
    /// The crc of every prefix of its lines (as [`Slot::data_crcs`]), when its newest
    /// header is sound and chained and only the data crc failed: its intact lines can
    /// be told from the rotten ones.
    prefix: Option<Vec<u32>>,
}

/// Walks the log from the superblock's writeback point (FORMAT.md, "Recovery"): replays
/// every intact segment into an index, tells a torn tail (the log ends) from damage (a
/// segment a later one proves durable), and records what the damage lost.
pub(crate) fn replay(dev: &dyn BlockDevice, sb: &Superblock, planned: usize) -> Result<Replay> {
    // Recovery reads ahead itself, in large reads, and reads single headers far apart.
    dev.advise_random(true);
    let r = std::thread::scope(|s| walk(s, dev, sb, planned));
    dev.advise_random(false);
    r
}

/// [`replay`], with the read-ahead's threads in `scope`.
fn walk<'scope, 'env>(
    scope: &'scope std::thread::Scope<'scope, 'env>,
    dev: &'env dyn BlockDevice,
    sb: &'env Superblock,
    planned: usize,
) -> Result<Replay> {
    let geo = &sb.geometry;
    let hl = geo.header_len();
    let mut damage;
    let mut recovered_gens = BTreeMap::new();
    // The line crcs of the segments replayed whole, for reads to check (a header that
    // passed every check records its lines' crcs truly, whatever the walk decides
    // later; the others are loaded from their headers when read).
    let mut line_crcs = crate::linecrc::LineCrcs::new(geo);
    // Format 2: the newest valid checkpoint not older than the writeback point.
    let headers = checkpoint_headers(dev, sb)?;
    let cp_seq = headers
        .iter()
        .filter_map(|(_, h)| h.as_ref().ok().map(|h| h.seq))
        .max()
        .unwrap_or(0);
    let mut skipped = Vec::new();
    let mut cp_durable = 0;
    let mut cp_time = Duration::ZERO;
    let mut base: Option<Base> = None;
    // The loss records of the checkpoint used, applied before the walk replays a
    // segment after its `U`.
    let mut record: Option<Record> = None;
    let mut wb = sb.last_writeback_id;
    let mut ahead: Option<ReadAhead> = None;
    if !headers.is_empty() {
        // A checkpoint's writeback point was committed before it was written.
        let committed = headers
            .iter()
            .filter_map(|(_, h)| h.as_ref().ok().map(|h| h.last_writeback_id))
            .max()
            .unwrap_or(0);
        wb = proven_writeback(dev, sb, wb.max(committed))?;
        let mut valid: Vec<(u64, CheckpointHeader)> = Vec::new();
        for (area, h) in headers {
            match h {
                Ok(h) => valid.push((area, h)),
                Err(e) => skipped.push(format!("area {}: {e}", ["A", "B"][area as usize])),
            }
        }
        valid.sort_by_key(|(_, h)| std::cmp::Reverse(h.seq));
        // The segments after the checkpoint recovery will most likely use are read while
        // it loads.
        if let Some((_, h)) = valid.iter().find(|(_, h)| h.upto > wb) {
            ahead = Some(ReadAhead::start(
                scope,
                dev,
                sb,
                h.upto + 1,
                wb + geo.nr_segments,
            ));
        }
        let started = Instant::now();
        // The newest checkpoint that loads is used: its index when it covers segments
        // not yet written back, its loss records in any case (docs/FORMAT.md, "Loss
        // records").
        for (area, h) in valid {
            let name = ["A", "B"][area as usize];
            cp_durable = cp_durable.max(h.durable_id);
            if record.is_some() {
                skipped.push(format!("area {name}: checkpoint {} older", h.seq));
                continue;
            }
            let written_back = format!(
                "area {name}: checkpoint {} covers segments up to {}, all written back",
                h.seq, h.upto
            );
            if h.upto <= wb && h.nr_lost == 0 {
                skipped.push(written_back);
                record = Some(Record {
                    seq: h.seq,
                    upto: h.upto,
                    lost: Vec::new(),
                });
                continue;
            }
            match load_checkpoint(dev, sb, area, &h, wb, planned, CP_READ)? {
                Ok(mut b) => {
                    record = Some(Record {
                        seq: h.seq,
                        upto: h.upto,
                        lost: std::mem::take(&mut b.lost),
                    });
                    if h.record_only {
                        skipped.push(format!(
                            "area {name}: checkpoint {} holds loss records alone (the log is walked)",
                            h.seq
                        ));
                    } else if h.upto > wb {
                        base = Some(b);
                    } else {
                        skipped.push(format!("{written_back} (its loss records used)"));
                    }
                }
                Err(e) => skipped.push(format!("area {name}: {e}")),
            }
        }
        cp_time = started.elapsed();
    }
    let mut report = RecoveryReport {
        last_writeback_id: wb,
        checkpoint_skipped: skipped,
        checkpoint_time: cp_time,
        ..Default::default()
    };
    let walk_started = Instant::now();
    let mut last_id = wb;
    // What segment `wb + 1` chains to, when the superblock recorded it for this `wb`
    // (a checkpoint or a reused slot may have raised the point past it).
    let mut wb_crc = sb.last_writeback_crc.filter(|_| wb == sb.last_writeback_id);
    let mut last_crc = wb_crc.unwrap_or(0);
    let mut chain: BTreeMap<u64, u32> = BTreeMap::new();
    let mut first_id = wb + 1;
    let mut index;
    if let Some(b) = base {
        report.checkpoint = Some(CheckpointUse {
            seq: b.header.seq,
            upto: b.header.upto,
            last_writeback_id: b.header.last_writeback_id,
            entries: b.header.nr_entries - b.header.nr_lost,
            loaded: b.loaded,
        });
        report.restored_lines = b.loaded;
        last_id = b.header.upto;
        last_crc = b.header.upto_crc;
        first_id = last_id + 1;
        index = b.index;
    } else {
        index = Index::with_capacity(planned);
    }
    // The record applies from the first segment written after its snapshot on: a copy
    // in one heals the sectors it holds.
    let mut record_due;
    (damage, record_due) = walk_damage(geo, &record, &mut report, first_id);
    // Another header crc of the last segment the next may chain to: when the last
    // segment is damaged, the next follows whichever of its headers was final.
    let mut alt_crc: Option<u32> = None;
    // False after a damaged segment whose header is unknown: the next one cannot be
    // checked against it.
    let mut chain_known = true;
    // The previous segment was taken at a header that may not be its final one.
    let mut pending: Option<Pending> = None;
    // The last segment that was taken at an uncertain header (see `Pending`).
    let mut uncertain: Option<u64> = None;
    let mut claims = Claims {
        max: sb.durable_id.max(cp_durable),
        scanned_to: 0,
    };
    let mut start = wb;
    let mut id = first_id;
    let mut ahead = match ahead {
        Some(a) if a.from == first_id => a,
        _ => ReadAhead::start(scope, dev, sb, first_id, start + geo.nr_segments),
    };
    while id - start <= geo.nr_segments {
        let window_end = start + geo.nr_segments;
        let mut slot = match ahead.take(id) {
            Some(s) => s,
            None => Slot::read_head(dev, sb, id)?,
        };
        let copies = crate::format::decode_copies(&slot.head, geo);
        // The slot was reused for a later lap, which the flusher does only after every
        // segment up to `h.id - nr_segments` was written back and that was committed:
        // the superblock we read is older than that commit (its newer copy is
        // damaged). Restart from the proven point.
        let reused = copies.iter().flatten().find_map(|(h, _)| {
            (h.uuid == sb.uuid && h.id > id && (h.id - id).is_multiple_of(geo.nr_segments))
                .then(|| h.id - geo.nr_segments)
        });
        if let Some(proven) = reused {
            report = RecoveryReport {
                last_writeback_id: proven,
                checkpoint_time: report.checkpoint_time,
                ..Default::default()
            };
            index = Index::with_capacity(planned);
            // The walk restarts after the checkpoint's segments (`proven` is at least
            // the slot's id, after `U`): its loss records hold as before.
            (damage, record_due) = walk_damage(geo, &record, &mut report, proven + 1);
            recovered_gens.clear();
            pending = None;
            claims = Claims {
                max: sb.durable_id.max(cp_durable),
                scanned_to: 0,
            };
            chain_known = true;
            last_id = proven;
            last_crc = 0;
            wb_crc = None;
            chain.clear();
            alt_crc = None;
            start = proven;
            id = proven + 1;
            drop(ahead);
            ahead = ReadAhead::start(scope, dev, sb, id, start + geo.nr_segments);
            continue;
        }
        // This segment's headers, newest append first.
        let mut mine: Vec<(SegmentHeader, u32)> = copies
            .iter()
            .flatten()
            .filter(|(h, _)| h.uuid == sb.uuid && h.id == id && h.lap == geo.lap(id))
            .cloned()
            .collect();
        mine.sort_by_key(|(h, _)| std::cmp::Reverse(h.gen));
        if let Some(p) = pending.take() {
            uncertain = Some(p.id());
            // Which header of the previous segment this one follows tells which was final.
            let follows = mine.first().map(|(h, _)| h.prev_crc);
            let durable = claims.cover(dev, sb, &mut ahead, p.id(), window_end)?;
            match resolve(&p, follows, last_crc, durable) {
                Resolution::Fine => {}
                Resolution::Torn => {
                    report.tail = Some(format!(
                        "segment {}: its last append torn, segment {id} after it",
                        p.id()
                    ));
                    break;
                }
                Resolution::Lost { follow } => {
                    if let Pending::Newer { crc, .. } = &p {
                        if follow {
                            last_crc = *crc;
                        }
                        lost_append(
                            &mut index,
                            &mut damage,
                            &mut report,
                            &mut recovered_gens,
                            &p,
                        );
                    }
                }
                Resolution::Unknown => {
                    if let Pending::Unreadable { id: x, gen } = p {
                        unknown_final(&mut damage, &mut recovered_gens, &mut report, x, gen);
                        chain_known = false;
                    }
                }
            }
        }
        if record_due && record.as_ref().is_some_and(|r| id > r.upto) {
            record_due = false;
            apply_record(&mut damage, &mut report, record.as_ref());
        }
        // A slot holds no segment of this log when no copy has the magic, or each is
        // another cache's or an earlier lap's.
        let foreign = copies.iter().zip(0..).all(|(c, i)| match c {
            Ok((h, _)) => h.uuid != sb.uuid || h.id < id,
            Err(_) => slot.head[i * hl..i * hl + 8] != crate::format::SEG_MAGIC[..],
        });
        let why_not = |copies: &[std::result::Result<(SegmentHeader, u32), String>]| {
            copies
                .iter()
                .map(|c| match c {
                    Ok((h, _)) if h.id != id => format!("slot holds segment {}", h.id),
                    Ok((h, _)) => format!("lap {} != {}", h.lap, geo.lap(id)),
                    Err(e) => e.clone(),
                })
                .collect::<Vec<_>>()
                .join("; ")
        };
        // A later append of the segment failed its checks and an earlier one is taken:
        // the newer header, kept to tell what it held.
        let mut newer: Option<(SegmentHeader, u32, Vec<u32>)> = None;
        let checked: std::result::Result<(SegmentHeader, u32), Bad> = if mine.is_empty() {
            Err(Bad {
                header: None,
                reason: if foreign {
                    "slot holds no segment of this log".into()
                } else {
                    why_not(&copies)
                },
                foreign,
                proven: false,
                older_crc: None,
                prefix: None,
            })
        } else {
            let h = &mine[0].0;
            // The first segment after the writeback point chains to what the superblock
            // recorded, when it did (else to anything: nothing before it is known).
            let chained = (id == start + 1 && wb_crc.is_none())
                || h.prev_crc == last_crc
                || alt_crc == Some(h.prev_crc);
            if chain_known && !chained {
                Err(Bad {
                    header: Some(mine[0].clone()),
                    reason: format!("not chained to segment {}", id - 1),
                    foreign: false,
                    proven: false,
                    older_crc: None,
                    prefix: None,
                })
            } else if !chain_known && !claims.cover(dev, sb, &mut ahead, id, window_end)? {
                // After a damaged segment of unknown content only a segment proven
                // durable can be taken: anything else may be left over from before an
                // earlier recovery.
                Err(Bad {
                    header: Some(mine[0].clone()),
                    reason: format!("cannot be chained to damaged segment {}", id - 1),
                    foreign: false,
                    proven: false,
                    older_crc: None,
                    prefix: None,
                })
            } else {
                let most = mine.iter().map(|(h, _)| h.entries.len()).max();
                let crcs = slot.data_crcs(dev, sb, id, most.unwrap_or(0))?;
                let sound = |h: &SegmentHeader| crcs.get(h.entries.len()) == Some(&h.data_crc);
                match mine.iter().position(|(h, _)| sound(h)) {
                    Some(0) => Ok(mine[0].clone()),
                    Some(i) => {
                        let (nh, ncrc) = mine[0].clone();
                        newer = Some((nh, ncrc, crcs.to_vec()));
                        Ok(mine[i].clone())
                    }
                    None => Err(Bad {
                        // Append `gen` is written only after append `gen - 1` was made
                        // durable: a header of a later append proves the segment held
                        // durable lines.
                        proven: mine[0].0.gen >= 2,
                        older_crc: mine.get(1).map(|(_, c)| *c),
                        header: Some(mine[0].clone()),
                        reason: "data checksum mismatch".into(),
                        foreign: false,
                        prefix: Some(crcs.to_vec()),
                    }),
                }
            }
        };
        match checked {
            Ok((h, hcrc)) => {
                for (slot, e) in h.entries.iter().enumerate() {
                    replay_entry(&mut index, &mut damage, &mut report, id, slot, e);
                }
                line_crcs.record(id, 0, h.entries.iter().map(|e| e.crc));
                report.replayed_segments += 1;
                chain.insert(id - 1, h.prev_crc);
                last_crc = hcrc;
                alt_crc = None;
                chain_known = true;
                // Taken at a header that may not be the segment's final one: a newer
                // append failed its checks, or a header copy is unreadable. The next
                // segment tells (see `Pending`).
                // The other copy of a format-2 segment holds another append's header
                // of it, or zeros (written with append 1); anything else is a header
                // that cannot be read.
                let unreadable = copies.iter().zip(0..).any(|(c, i)| match c {
                    Ok((o, _)) => o.id != id || o.uuid != sb.uuid,
                    Err(_) => slot.head[i * hl..(i + 1) * hl].iter().any(|&b| b != 0),
                });
                pending = match newer {
                    Some((nh, ncrc, prefix)) => {
                        recovered_gens.insert(id, h.gen);
                        Some(Pending::Newer {
                            id,
                            gen: nh.gen,
                            first: h.entries.len(),
                            lines: nh.entries[h.entries.len()..].to_vec(),
                            crc: ncrc,
                            prefix,
                        })
                    }
                    None if unreadable => Some(Pending::Unreadable { id, gen: h.gen }),
                    None => None,
                };
            }
            Err(bad) if bad.proven || claims.cover(dev, sb, &mut ahead, id, window_end)? => {
                // A later segment says this one was durable: damage, not the end. Its
                // lines that match their crcs are replayed, the others are lost.
                match (&bad.header, &bad.prefix) {
                    (Some((h, _)), Some(prefix)) => {
                        salvage(
                            &mut index,
                            &mut damage,
                            &mut report,
                            id,
                            0,
                            &h.entries,
                            prefix,
                        );
                    }
                    (h, _) => damage.add_segment(id, h.as_ref().map(|(h, _)| &h.entries[..])),
                }
                report.damaged.push((id, bad.reason));
                match bad.header {
                    Some((_, hcrc)) => {
                        last_crc = hcrc;
                        alt_crc = bad.older_crc;
                        chain_known = true;
                    }
                    None => chain_known = false,
                }
            }
            Err(bad) => {
                if !bad.foreign {
                    report.tail = Some(format!("segment {id}: {}", bad.reason));
                }
                break;
            }
        }
        last_id = id;
        id += 1;
    }
    // The last segment walked was taken at a header that may not be its final one.
    let mut ambiguous = false;
    if let Some(p) = pending.take() {
        let durable = claims.cover(dev, sb, &mut ahead, p.id(), start + geo.nr_segments)?;
        match (resolve(&p, None, last_crc, durable), p) {
            (Resolution::Lost { .. }, p @ Pending::Newer { .. }) => {
                lost_append(
                    &mut index,
                    &mut damage,
                    &mut report,
                    &mut recovered_gens,
                    &p,
                );
            }
            (Resolution::Unknown, Pending::Unreadable { id: x, gen }) => {
                unknown_final(&mut damage, &mut recovered_gens, &mut report, x, gen);
                chain_known = false;
            }
            (_, p) => ambiguous = p.id() == last_id,
        }
    }
    if record_due {
        apply_record(&mut damage, &mut report, record.as_ref());
    }
    // Also when the segment after it ended the log: nothing after it is durable to
    // tell which of its headers was final (a claim covering it now would make the next
    // recovery take its torn newer append for a durable one).
    ambiguous |= uncertain == Some(last_id);
    if !chain_known {
        // Resuming after a segment of unknown header: nothing to chain to.
        last_crc = 0;
    }
    chain.insert(last_id, last_crc);
    report.walk_time = walk_started.elapsed();
    Ok(Replay {
        line_crcs,
        chain,
        wb_crc,
        cp_seq,
        cp_upto: report.checkpoint.as_ref().map_or(0, |c| c.upto),
        ambiguous,
        wb_id: start,
        index,
        last_id,
        last_crc,
        damage,
        recovered_gens,
        report,
    })
}

/// A segment taken at a header that may not be its final one; the segment after it
/// decides.
enum Pending {
    /// Append `gen` (header crc `crc`, adding `lines`) failed its data check and the
    /// append before it was taken. If the next segment follows `crc` and is durable,
    /// that append was durable: its lines are lost. If it follows `crc` but is not
    /// proven durable, the append was torn and the log ends. Else (it follows the
    /// taken header, or there is none) the append was torn: nothing acknowledged is
    /// lost.
    Newer {
        id: u64,
        gen: u16,
        /// The slot of `lines[0]` (the line count of the append taken).
        first: usize,
        lines: Vec<crate::format::Entry>,
        crc: u32,
        /// The crc of every prefix of the segment's lines (as [`Slot::data_crcs`]).
        prefix: Vec<u32>,
    },
    /// A header copy is unreadable and append `gen` was taken. If the next segment is
    /// durable but follows no header taken, the unreadable copy was the final header.
    Unreadable { id: u64, gen: u16 },
}

impl Pending {
    fn id(&self) -> u64 {
        match self {
            Pending::Newer { id, .. } | Pending::Unreadable { id, .. } => *id,
        }
    }
}

/// What a [`Pending`] segment turned out to be.
enum Resolution {
    /// The header taken was its final one (or nothing proves otherwise).
    Fine,
    /// Its newer append was final and durable: the lines it added are lost; `follow`:
    /// the next segment chains to it.
    Lost { follow: bool },
    /// Its final header is the unreadable copy: the lines it added are unknown.
    Unknown,
    /// Its newer append was final but never durable, and the next segment follows
    /// it: the log ends with the header taken.
    Torn,
}

/// Decides a [`Pending`] segment from the header crc the next segment follows (`None`:
/// no next segment) and whether the segment is proven durable: a durable segment was
/// sealed and its final header made durable in this log's history (recovery never
/// lets a segment it took at an uncertain header be claimed durable until the next
/// one is, see `Replay::ambiguous`), so its newest append is its final one.
fn resolve(p: &Pending, follows: Option<u32>, taken: u32, durable: bool) -> Resolution {
    if follows == Some(taken) {
        return Resolution::Fine;
    }
    match p {
        Pending::Newer { crc, .. } if durable => Resolution::Lost {
            follow: follows == Some(*crc),
        },
        Pending::Newer { crc, .. } if follows == Some(*crc) => Resolution::Torn,
        Pending::Unreadable { .. } if durable => Resolution::Unknown,
        _ => Resolution::Fine,
    }
}

/// True when line `slot` of a segment, whose prefix crcs are `prefix` (`prefix[n]`:
/// the crc of lines `0..n`), matches its crc `want` from the header (none recorded:
/// false). The line's own crc is `prefix[slot + 1] ^ Z(prefix[slot])` (see
/// [`crate::format::crc_extend_line`]).
fn line_intact(prefix: &[u32], slot: usize, want: Option<u32>) -> bool {
    match (want, prefix.get(slot), prefix.get(slot + 1)) {
        (Some(w), Some(&a), Some(&b)) => b ^ crate::format::crc_extend_line(a, 0) == w,
        _ => false,
    }
}

/// The loss records of the checkpoint recovery uses (docs/FORMAT.md, "Loss records").
struct Record {
    seq: u64,
    /// Its `U`: the records hold as of the walk's arrival at segment `upto + 1`.
    upto: u64,
    /// (line key, lost sectors).
    lost: Vec<(u64, u8)>,
}

/// The damage a walk starting at segment `first_id` starts from, and whether
/// `record` is still due (applied when the walk passes its `U`).
fn walk_damage(
    geo: &Geometry,
    record: &Option<Record>,
    report: &mut RecoveryReport,
    first_id: u64,
) -> (Damage, bool) {
    let mut damage = Damage {
        records: geo.appends(),
        ..Default::default()
    };
    report.loss_records = None;
    let due = record.as_ref().is_some_and(|r| r.upto >= first_id);
    if !due {
        apply_record(&mut damage, report, record.as_ref());
    }
    (damage, due)
}

/// Adds `record`'s lost sectors to `damage` (every segment walked so far is older than
/// its snapshot, every one after is newer).
fn apply_record(damage: &mut Damage, report: &mut RecoveryReport, record: Option<&Record>) {
    if let Some(r) = record {
        damage.load_record(&r.lost);
        report.loss_records = (!r.lost.is_empty()).then_some((r.seq, r.lost.len() as u64));
    }
}

/// The copies `entries` of damaged segment `id`, from slot `first` on (`prefix`: the
/// segment's prefix crcs): those matching their line crcs, and discard records, are
/// replayed, the others lost. Returns whether any was replayed.
fn salvage(
    index: &mut Index,
    damage: &mut Damage,
    report: &mut RecoveryReport,
    id: u64,
    first: usize,
    entries: &[crate::format::Entry],
    prefix: &[u32],
) -> bool {
    damage.segments.insert(id);
    let mut kept = false;
    for (i, e) in entries.iter().enumerate() {
        // A discard record carries no data: its entry, under the sound header, is all
        // of it.
        if e.is_tombstone() || line_intact(prefix, first + i, e.crc) {
            replay_entry(index, damage, report, id, first + i, e);
            kept = true;
        } else {
            damage.lose_entry(id, e);
        }
    }
    kept
}

/// Replays copy `e` in slot `slot` of segment `id`: it becomes its line's newest copy.
fn replay_entry(
    index: &mut Index,
    damage: &mut Damage,
    report: &mut RecoveryReport,
    id: u64,
    slot: usize,
    e: &crate::format::Entry,
) {
    let k = e.line_key();
    damage.supersede(k, if e.is_tombstone() { FULL_LINE } else { e.dirty }, id);
    index.insert(
        k,
        Loc {
            seg: id,
            slot: slot as u16,
            dirty: e.dirty,
            tomb: e.is_tombstone(),
            clean: e.is_clean(),
        },
    );
    report.restored_lines += 1;
}

/// The newer append of pending segment `p` ([`Pending::Newer`]) was durable but failed
/// its data check: of the lines it added, those matching their crcs are replayed and the
/// others lost. When any was replayed the segment is no longer taken at the older
/// append: writeback and the cleaner read it with its newest header, which lists them.
fn lost_append(
    index: &mut Index,
    damage: &mut Damage,
    report: &mut RecoveryReport,
    gens: &mut BTreeMap<u64, u16>,
    p: &Pending,
) {
    let Pending::Newer {
        id,
        gen,
        first,
        lines,
        prefix,
        ..
    } = p
    else {
        return;
    };
    if salvage(index, damage, report, *id, *first, lines, prefix) {
        gens.remove(id);
    }
    report
        .damaged
        .push((*id, format!("append {gen} data checksum mismatch")));
}

/// Records that segment `id`, proven durable and taken at append `gen`, lost its final
/// header: the lines it added after `gen` are unknown. The lines of `gen` stay in the
/// index (writeback uses that append), but like any line of a segment whose header is
/// unknown they are refused until rewritten.
fn unknown_final(
    damage: &mut Damage,
    recovered_gens: &mut BTreeMap<u64, u16>,
    report: &mut RecoveryReport,
    id: u64,
    gen: u16,
) {
    damage.add_segment(id, None);
    recovered_gens.insert(id, gen);
    report.damaged.push((id, "final header unreadable".into()));
}

/// The newest header in the slot of segment `id`, if any copy is exactly that segment
/// of this cache.
fn header_of(
    dev: &dyn BlockDevice,
    sb: &Superblock,
    id: u64,
) -> Result<Option<(SegmentHeader, u32)>> {
    let geo = &sb.geometry;
    let mut buf = AlignedBuf::new(geo.data_start());
    let off = geo.segment_offset(id);
    dev.read_at(&mut buf, off)
        .map_err(|e| Error::io(&dev.describe(), off, e))?;
    Ok(crate::format::newest_header(&buf, geo, id, &sb.uuid))
}

/// The newest valid superblock of a cache device that is as large as it says.
pub(crate) fn superblock_of(dev: &dyn BlockDevice) -> Result<Superblock> {
    let sb = probe(dev)?.ok_or_else(|| Error::BadFormat {
        device: dev.describe(),
        reason: "not an lc cache device (no superblock); format it first".into(),
    })?;
    let geo = sb.geometry;
    let needed = geo.device_bytes();
    if dev.size() < needed {
        return Err(Error::BadFormat {
            device: dev.describe(),
            reason: format!(
                "device is {} bytes but was formatted for {needed}",
                dev.size()
            ),
        });
    }
    Ok(sb)
}

/// What [`check_device`] found.
#[derive(Clone, Debug)]
pub struct CheckReport {
    /// The newest valid superblock.
    pub superblock: Superblock,
    /// The log walk, as recovery would do it.
    pub log: RecoveryReport,
    /// Dirty lines (and discard records) per backing device id: lines, not copies.
    pub dirty_lines: Vec<(u8, u64)>,
    /// What recovery would find lost, when the log is damaged.
    pub damage: Option<crate::damage::DamageReport>,
    /// Each superblock copy (A, B): `None` when sound, else why it is not. One damaged
    /// copy loses nothing (the other is used) but the next commit rewrites it.
    pub superblock_copies: [Option<String>; 2],
}

/// `lc check` after a walk that started from a checkpoint: the lines the checkpoint
/// indexed (segments up to its `upto`) were not read, so each is read now and checked
/// against its line crc, as the serving cache checks a line it reads (FORMAT.md,
/// "Damage found while serving"): a rotten copy, or one its segment's header does not
/// list, is lost (a clean copy is only dropped: the backing device holds it); a header
/// that no longer reads loses every copy indexed in its segment. A copy whose header
/// records no line crc, or a discard record, is not checked.
fn scrub_checkpointed(dev: &dyn BlockDevice, sb: &Superblock, r: &mut Replay) -> Result<()> {
    let Some(cp) = r.report.checkpoint.as_ref().map(|c| (c.seq, c.upto)) else {
        return Ok(());
    };
    let geo = &sb.geometry;
    let mut by_seg: BTreeMap<u64, Vec<(u64, Loc)>> = BTreeMap::new();
    for (k, l) in r.index.iter().filter(|(_, l)| l.seg <= cp.1) {
        by_seg.entry(l.seg).or_default().push((k, l));
    }
    let mut buf = AlignedBuf::new(geo.segment_size as usize);
    for (seg, copies) in by_seg {
        let off = geo.segment_offset(seg);
        dev.read_at(&mut buf, off)
            .map_err(|e| Error::io(&dev.describe(), off, e))?;
        let gen = r.recovered_gens.get(&seg).copied();
        let header = crate::format::segment_header(&buf, geo, seg, &sb.uuid, gen);
        let mut lost = 0;
        for (k, l) in copies {
            let at = geo.data_start() + l.slot as usize * LINE as usize;
            let sound = header.as_ref().is_some_and(|h| {
                // A discard record's bytes carry nothing.
                h.entries.get(l.slot as usize).is_some_and(|e| {
                    e.is_tombstone()
                        || e.crc
                            .is_none_or(|c| crate::format::crc(&buf[at..at + LINE as usize]) == c)
                })
            });
            if sound {
                continue;
            }
            if r.damage.lose_copy(&mut r.index, seg, k, l) {
                lost += 1;
            }
        }
        if lost > 0 {
            let why = match header {
                Some(_) => "line checksum mismatch",
                None => "header unreadable",
            };
            r.report.damaged.push((
                seg,
                format!(
                    "{why} (covered by checkpoint {}, read by lc check): {lost} lines lost",
                    cp.0
                ),
            ));
        }
    }
    r.report.damaged.sort_by_key(|d| d.0);
    Ok(())
}

/// Read-only metadata check of a cache device: reads the superblock and walks the log
/// exactly as recovery would, without writing anything or starting threads; then reads
/// and checks every line a checkpoint indexed (`scrub_checkpointed`).
pub fn check_device(dev: &dyn BlockDevice) -> Result<CheckReport> {
    let sb = superblock_of(dev)?;
    let mut r = replay(dev, &sb, 1024)?;
    scrub_checkpointed(dev, &sb, &mut r)?;
    let mut counts = vec![0u64; MAX_BACKING];
    for (k, _) in r.index.iter() {
        counts[crate::index::unkey(k).0 as usize] += 1;
    }
    let dirty_lines = counts
        .iter()
        .enumerate()
        .filter(|(_, &n)| n > 0)
        .map(|(i, &n)| (i as u8, n))
        .collect();
    let copies = read_copies(dev)?.map(|(c, _)| c).unwrap_or_default();
    let status = |i: usize| {
        copies
            .get(i)
            .and_then(|c| c.as_ref().err().map(|e| e.to_string()))
    };
    Ok(CheckReport {
        superblock: sb,
        log: r.report,
        dirty_lines,
        damage: (!r.damage.segments.is_empty() || r.damage.unresolved()).then(|| r.damage.report()),
        superblock_copies: [status(0), status(1)],
    })
}

#[cfg(test)]
mod tests {
    //! The checkpoint load read in many chunks by several readers: the same index as
    //! one chunk gives, and each failure (a read, a malformed entry, the crc) reported
    //! as such wherever its chunk falls.
    use super::*;
    use crate::device::MemDevice;
    use crate::engine::{Backing, Cache};
    use crate::open::OpenOptions;
    use crate::testing::FaultDevice;
    use crate::tunables::Tunables;
    use std::sync::Arc;

    const SEG: u32 = 64 << 10;
    /// Lines written: the checkpoint spans several 4 KiB chunks of 256 entries.
    const LINES: u64 = 3000;
    const CHUNK: usize = 4096;

    /// A cache closed cleanly after `LINES` distinct writes: its image.
    fn closed_cache() -> Vec<u8> {
        let cache: Arc<dyn BlockDevice> = Arc::new(MemDevice::new(512 * SEG as u64));
        format_device(
            cache.as_ref(),
            FormatOptions {
                block_size: 512,
                segment_size: SEG,
                version: crate::format::FORMAT_VERSION,
            },
        )
        .unwrap();
        let backing: Arc<dyn BlockDevice> = Arc::new(MemDevice::new(LINES * LINE));
        let (c, _) = Cache::open(
            cache.clone(),
            vec![Backing {
                id: 0,
                dev: backing,
                label: "b".into(),
            }],
            OpenOptions {
                tunables: Tunables {
                    writeback_enabled: false,
                    flush_interval_s: 0,
                    ..Tunables::default()
                },
                ..Default::default()
            },
        )
        .unwrap();
        // In an order (a stride of 7) that is neither the lines' nor the table's.
        for i in 0..LINES {
            let line = i * 7 % LINES;
            c.write(0, line * LINE, &[line as u8; LINE as usize], false)
                .unwrap();
        }
        c.close().unwrap();
        let mut img = vec![0u8; cache.size() as usize];
        cache.read_at(&mut img, 0).unwrap();
        img
    }

    /// The image's newest checkpoint: the superblock, its area and header.
    fn newest(dev: &dyn BlockDevice) -> (Superblock, u64, CheckpointHeader) {
        let sb = superblock_of(dev).unwrap();
        let (area, h) = checkpoint_headers(dev, &sb)
            .unwrap()
            .into_iter()
            .filter_map(|(a, h)| h.ok().map(|h| (a, h)))
            .max_by_key(|(_, h)| h.seq)
            .expect("a checkpoint");
        (sb, area, h)
    }

    fn load(
        dev: &dyn BlockDevice,
        chunk: usize,
    ) -> Result<std::result::Result<Vec<(u64, Loc)>, String>> {
        let (sb, area, h) = newest(dev);
        let r = load_checkpoint(dev, &sb, area, &h, h.last_writeback_id, 4096, chunk)?;
        Ok(r.map(|b| {
            assert_eq!(b.loaded, h.nr_entries);
            let mut v: Vec<_> = b.index.iter().collect();
            v.sort_unstable_by_key(|e| e.0);
            v
        }))
    }

    /// Byte offset in the image of entry `n` of the newest checkpoint.
    fn entry_at(img: &[u8], n: usize) -> usize {
        let dev = MemDevice::from_bytes(img.to_vec(), "cache");
        let (sb, area, h) = newest(&dev);
        assert!(h.nr_entries as usize > n);
        (sb.geometry.checkpoint_offset(area) as usize) + CP_HEADER + n * CP_ENTRY
    }

    #[test]
    fn many_chunks_load_what_one_chunk_loads() {
        let img = closed_cache();
        let dev = MemDevice::from_bytes(img, "cache");
        let whole = load(&dev, CP_READ).unwrap().unwrap();
        assert_eq!(whole.len() as u64, LINES);
        let chunked = load(&dev, CHUNK).unwrap().unwrap();
        assert_eq!(chunked, whole);
    }

    #[test]
    fn a_malformed_entry_in_a_late_chunk_is_named() {
        let mut img = closed_cache();
        let n = 9 * CHUNK / CP_ENTRY + 3;
        let at = entry_at(&img, n) + 8;
        img[at] |= 4; // loc bit 2: reserved, 0 in every sound entry
        let dev = MemDevice::from_bytes(img, "cache");
        let e = load(&dev, CHUNK).unwrap().unwrap_err();
        assert!(e.contains(&format!("entry {n} malformed")), "{e}");
    }

    #[test]
    fn a_changed_entry_fails_the_checksum() {
        let mut img = closed_cache();
        let n = LINES as usize - 1;
        let at = entry_at(&img, n);
        img[at] ^= 0x80; // a key's line number: still a sound entry
        let dev = MemDevice::from_bytes(img, "cache");
        let e = load(&dev, CHUNK).unwrap().unwrap_err();
        assert!(e.contains("checksum mismatch"), "{e}");
    }

    #[test]
    fn a_failed_read_of_a_late_chunk_is_an_io_error() {
        let img = closed_cache();
        let bad = entry_at(&img, 7 * CHUNK / CP_ENTRY + 1) as u64;
        let dev = FaultDevice::new(Arc::new(MemDevice::from_bytes(img, "cache")));
        dev.faults
            .lock()
            .unwrap()
            .bad_read_sectors
            .insert(bad / 512);
        match load(&dev, CHUNK) {
            Err(Error::Io { offset, .. }) => {
                assert_eq!(offset, bad / CHUNK as u64 * CHUNK as u64)
            }
            Err(e) => panic!("{e}"),
            Ok(r) => panic!("loaded: {:?}", r.map(|v| v.len())),
        }
    }
}
