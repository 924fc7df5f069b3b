//! Formatting a cache device, reading its superblock, and replaying its log after
//! `last_writeback_id` into an index ([`replay`], which `Cache::open` and
//! [`check_device`] share).
//!
//! Replay walks ids `wb+1, wb+2, ...` and stops at the first segment that fails any
//! check: header magic and crc32c, cache uuid, id and lap matching the slot, the chain
//! (`prev_crc` equals the crc of the previous replayed header), entry sanity, and the
//! crc32c of the line data. Nothing after a failed segment is trusted. Recovery itself
//! writes nothing, so a crash during recovery leaves the device as it was.

use std::time::Instant;

use crate::damage::Damage;
use crate::device::{AlignedBuf, BlockDevice};
use crate::error::{Error, Result};
use crate::format::{
    crc, Geometry, SegmentHeader, Superblock, FULL_LINE, LINE, MAX_BACKING, SB_COPY_SIZE,
    SEAL_AHEAD, SECTORS_PER_LINE,
};
use crate::index::{key, Index, Loc};

/// Options for [`format_device`].
#[derive(Clone, Copy, Debug)]
pub struct FormatOptions {
    /// Logical block size, 512 or 4096.
    pub block_size: u32,
    /// Segment size, a power of two from 64 KiB to 4 MiB.
    pub segment_size: u32,
}

impl Default for FormatOptions {
    fn default() -> Self {
        FormatOptions {
            block_size: 512,
            segment_size: 1 << 20,
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
    let geo = Geometry::new(opts.block_size, opts.segment_size, dev.size())?;
    let uuid = random_uuid();
    let desc = dev.describe();
    for seq in [0u64, 1] {
        let sb = Superblock {
            geometry: geo,
            uuid,
            seq,
            last_writeback_id: 0,
            durable_id: 0,
            backing: vec![None; MAX_BACKING],
        };
        let off = Superblock::copy_offset(seq);
        dev.write_at(&sb.encode(), off)
            .map_err(|e| Error::io(&desc, off, e))?;
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
            .max_by_key(|e| e.to_string().contains("version") as u8)
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
    pub report: RecoveryReport,
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
        id: u64,
        window_end: u64,
    ) -> Result<bool> {
        let end = window_end.min(id + 2 * SEAL_AHEAD);
        self.scanned_to = self.scanned_to.max(id);
        while self.max < id && self.scanned_to < end {
            self.scanned_to += 1;
            if let Some(h) = header_of(dev, sb, self.scanned_to)? {
                self.max = self.max.max(h.0.durable);
            }
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
}

/// Walks the log from the superblock's writeback point (FORMAT.md, "Recovery"): replays
/// every intact segment into an index, tells a torn tail (the log ends) from damage (a
/// segment a later one proves durable), and records what the damage lost.
pub(crate) fn replay(dev: &dyn BlockDevice, sb: &Superblock, planned: usize) -> Result<Replay> {
    let geo = &sb.geometry;
    let hl = geo.header_len();
    let desc = dev.describe();
    let mut index = Index::with_capacity(planned);
    let mut damage = Damage::default();
    let mut report = RecoveryReport {
        last_writeback_id: sb.last_writeback_id,
        ..Default::default()
    };
    let mut last_id = sb.last_writeback_id;
    let mut last_crc = 0u32;
    // False after a damaged segment whose header is unknown: the next one cannot be
    // checked against it.
    let mut chain_known = true;
    let mut claims = Claims {
        max: sb.durable_id,
        scanned_to: 0,
    };
    let mut buf = AlignedBuf::new(geo.segment_size as usize);
    let mut start = sb.last_writeback_id;
    let mut id = start + 1;
    while id - start <= geo.nr_segments {
        let window_end = start + geo.nr_segments;
        let off = geo.segment_offset(id);
        dev.read_at(&mut buf[..hl], off)
            .map_err(|e| Error::io(&desc, off, e))?;
        let checked: std::result::Result<(SegmentHeader, u32), Bad> =
            match SegmentHeader::decode(&buf[..hl], geo) {
                Err(reason) => Err(Bad {
                    header: None,
                    reason,
                    foreign: buf[..8] != crate::format::SEG_MAGIC[..],
                }),
                Ok((h, _)) if h.uuid != sb.uuid || h.id < id => Err(Bad {
                    header: None,
                    reason: format!("slot holds segment {} of an earlier lap or format", h.id),
                    foreign: true,
                }),
                Ok((h, _)) if h.id > id && (h.id - id).is_multiple_of(geo.nr_segments) => {
                    // The slot was reused for a later lap, which the flusher does only
                    // after every segment up to `h.id - nr_segments` was written back and
                    // that was committed: the superblock we read is older than that
                    // commit (its newer copy is damaged). Restart from the proven point.
                    let proven = h.id - geo.nr_segments;
                    report = RecoveryReport {
                        last_writeback_id: proven,
                        ..Default::default()
                    };
                    index = Index::with_capacity(planned);
                    damage = Damage::default();
                    claims = Claims {
                        max: sb.durable_id,
                        scanned_to: 0,
                    };
                    chain_known = true;
                    last_id = proven;
                    last_crc = 0;
                    start = proven;
                    id = proven + 1;
                    continue;
                }
                Ok((h, _)) if h.id > id => Err(Bad {
                    header: None,
                    reason: format!("slot holds segment {}", h.id),
                    foreign: false,
                }),
                Ok((h, _)) if h.lap != geo.lap(id) => Err(Bad {
                    header: None,
                    reason: format!("lap {} != {}", h.lap, geo.lap(id)),
                    foreign: false,
                }),
                Ok((h, hcrc)) => {
                    let chained = id == start + 1 || h.prev_crc == last_crc;
                    if chain_known && !chained {
                        Err(Bad {
                            header: Some((h, hcrc)),
                            reason: format!("not chained to segment {}", id - 1),
                            foreign: false,
                        })
                    } else if !chain_known && !claims.cover(dev, sb, id, window_end)? {
                        // After a damaged segment of unknown content only a segment
                        // proven durable can be taken: anything else may be left over
                        // from before an earlier recovery.
                        Err(Bad {
                            header: Some((h, hcrc)),
                            reason: format!("cannot be chained to damaged segment {}", id - 1),
                            foreign: false,
                        })
                    } else {
                        let dlen = h.entries.len() * LINE as usize;
                        dev.read_at(&mut buf[hl..hl + dlen], off + hl as u64)
                            .map_err(|e| Error::io(&desc, off + hl as u64, e))?;
                        if crc(&buf[hl..hl + dlen]) != h.data_crc {
                            Err(Bad {
                                header: Some((h, hcrc)),
                                reason: "data checksum mismatch".into(),
                                foreign: false,
                            })
                        } else {
                            Ok((h, hcrc))
                        }
                    }
                }
            };
        match checked {
            Ok((h, hcrc)) => {
                for (slot, e) in h.entries.iter().enumerate() {
                    let k = key(e.dev, e.sector / SECTORS_PER_LINE);
                    damage.supersede(k, if e.is_tombstone() { FULL_LINE } else { e.dirty });
                    index.insert(
                        k,
                        Loc {
                            seg: id,
                            slot: slot as u16,
                            dirty: e.dirty,
                            tomb: e.is_tombstone(),
                        },
                    );
                    report.restored_lines += 1;
                }
                report.replayed_segments += 1;
                last_crc = hcrc;
                chain_known = true;
            }
            Err(bad) if claims.cover(dev, sb, id, window_end)? => {
                // A later segment says this one was durable: damage, not the end.
                damage.add_segment(id, bad.header.as_ref().map(|(h, _)| &h.entries[..]));
                report.damaged.push((id, bad.reason));
                match bad.header {
                    Some((_, hcrc)) => {
                        last_crc = hcrc;
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
    if !chain_known {
        // Resuming after a segment of unknown header: nothing to chain to.
        last_crc = 0;
    }
    Ok(Replay {
        wb_id: start,
        index,
        last_id,
        last_crc,
        damage,
        report,
    })
}

/// The header in the slot of segment `id`, if it is exactly that segment of this cache.
fn header_of(
    dev: &dyn BlockDevice,
    sb: &Superblock,
    id: u64,
) -> Result<Option<(SegmentHeader, u32)>> {
    let geo = &sb.geometry;
    let mut buf = AlignedBuf::new(geo.header_len());
    let off = geo.segment_offset(id);
    dev.read_at(&mut buf, off)
        .map_err(|e| Error::io(&dev.describe(), off, e))?;
    Ok(SegmentHeader::decode(&buf, geo)
        .ok()
        .filter(|(h, _)| h.id == id && h.uuid == sb.uuid && h.lap == geo.lap(id)))
}

/// The newest valid superblock of a cache device that is as large as it says.
pub(crate) fn superblock_of(dev: &dyn BlockDevice) -> Result<Superblock> {
    let sb = probe(dev)?.ok_or_else(|| Error::BadFormat {
        device: dev.describe(),
        reason: "not an lc cache device (no superblock); format it first".into(),
    })?;
    let geo = sb.geometry;
    let needed = geo.segment_size as u64 * (geo.nr_segments + 1);
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

/// Read-only metadata check of a cache device: reads the superblock and walks the log
/// exactly as recovery would, without writing anything or starting threads.
pub fn check_device(dev: &dyn BlockDevice) -> Result<CheckReport> {
    let sb = superblock_of(dev)?;
    let r = replay(dev, &sb, 1024)?;
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
        damage: (!r.damage.segments.is_empty()).then(|| r.damage.report()),
        superblock_copies: [status(0), status(1)],
    })
}
