//! Formatting a cache device and opening one: reading the superblock, replaying the log
//! after `last_writeback_id` into the index, and resuming after the last valid segment.
//!
//! Replay walks ids `wb+1, wb+2, ...` and stops at the first segment that fails any
//! check: header magic and crc32c, cache uuid, id and lap matching the slot, the chain
//! (`prev_crc` equals the crc of the previous replayed header), entry sanity, and the
//! crc32c of the line data. Nothing after a failed segment is trusted. Recovery itself
//! writes nothing, so a crash during recovery leaves the device as it was.

use std::collections::BTreeMap;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;

use slog::{info, warn};

use crate::device::{AlignedBuf, BlockDevice};
use crate::engine::{Backing, BackingSlot, Cache, Inner, OpenOptions, State};
use crate::error::{Error, Result};
use crate::format::{
    crc, Geometry, SegmentHeader, Superblock, LINE, MAX_BACKING, SB_COPY_SIZE, SECTORS_PER_LINE,
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
    /// Why replay stopped, if it stopped at a segment that failed a check rather
    /// than at one that was never written.
    pub stop_reason: Option<String>,
}

fn random_u64() -> u64 {
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
            backing: vec![None; MAX_BACKING],
        };
        let off = Superblock::copy_offset(seq);
        dev.write_at(&sb.encode(), off)
            .map_err(|e| Error::io(&desc, off, e))?;
    }
    dev.flush().map_err(|e| Error::io(&desc, 0, e))?;
    Ok(geo)
}

/// Reads the newest valid superblock copy. `Ok(None)` means the device holds no lc
/// superblock at all (neither copy has the magic).
pub fn probe(dev: &dyn BlockDevice) -> Result<Option<Superblock>> {
    let desc = dev.describe();
    if dev.size() < 2 * SB_COPY_SIZE as u64 {
        return Ok(None);
    }
    let mut best: Option<Superblock> = None;
    let mut errors = Vec::new();
    let mut any_magic = false;
    for copy in 0..2u64 {
        let mut b = vec![0u8; SB_COPY_SIZE];
        let off = copy * SB_COPY_SIZE as u64;
        dev.read_at(&mut b, off)
            .map_err(|e| Error::io(&desc, off, e))?;
        if b[..8] == crate::format::SB_MAGIC {
            any_magic = true;
        }
        match Superblock::decode(&b, &desc) {
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

struct Replay {
    wb_id: u64,
    index: Index,
    last_id: u64,
    last_crc: u32,
    report: RecoveryReport,
}

fn replay(dev: &dyn BlockDevice, sb: &Superblock, planned: usize) -> Result<Replay> {
    let geo = &sb.geometry;
    let hl = geo.header_len();
    let desc = dev.describe();
    let mut index = Index::with_capacity(planned);
    let mut report = RecoveryReport {
        last_writeback_id: sb.last_writeback_id,
        ..Default::default()
    };
    let mut last_id = sb.last_writeback_id;
    let mut last_crc = 0u32;
    let mut buf = AlignedBuf::new(geo.segment_size as usize);
    let mut start = sb.last_writeback_id;
    let mut id = start + 1;
    while id - start <= geo.nr_segments {
        let off = geo.segment_offset(id);
        dev.read_at(&mut buf[..hl], off)
            .map_err(|e| Error::io(&desc, off, e))?;
        let (h, hcrc) = match SegmentHeader::decode(&buf[..hl], geo) {
            Ok(x) => x,
            Err(reason) => {
                // A slot never written since format has no magic: a normal end, unless
                // the next segment of the log is there (then this one was damaged).
                let no_magic = buf[..8] != crate::format::SEG_MAGIC[..];
                if !no_magic || next_present(dev, sb, id + 1)? {
                    report.stop_reason = Some(format!("segment {id}: {reason}"));
                }
                break;
            }
        };
        // `Err(None)`: the log simply ends here (a slot from an earlier lap or an
        // earlier format); `Err(Some(reason))`: a segment that fails a check.
        let verdict: std::result::Result<(), Option<String>> = if h.uuid != sb.uuid || h.id < id {
            Err(None)
        } else if h.id > id {
            if (h.id - id).is_multiple_of(geo.nr_segments) {
                // The slot was reused for a later lap, which the flusher does only after
                // every segment up to `h.id - nr_segments` was written back and that was
                // committed: the superblock we read is older than that commit (its newer
                // copy is damaged). Restart the walk from the proven point.
                let proven = h.id - geo.nr_segments;
                report.last_writeback_id = proven;
                report.replayed_segments = 0;
                report.restored_lines = 0;
                index = Index::with_capacity(planned);
                last_id = proven;
                last_crc = 0;
                start = proven;
                id = proven + 1;
                continue;
            }
            Err(Some(format!("slot of segment {id} holds segment {}", h.id)))
        } else if h.lap != geo.lap(id) {
            Err(Some(format!(
                "segment {id}: lap {} != {}",
                h.lap,
                geo.lap(id)
            )))
        } else if id > start + 1 && h.prev_crc != last_crc {
            Err(Some(format!(
                "segment {id}: not chained to segment {}",
                id - 1
            )))
        } else {
            Ok(())
        };
        if let Err(reason) = verdict {
            report.stop_reason = match reason {
                Some(r) => Some(r),
                None if next_present(dev, sb, id + 1)? => Some(format!(
                    "segment {id} missing but segment {} present",
                    id + 1
                )),
                None => None,
            };
            break;
        }
        let n = h.entries.len();
        let dlen = n * LINE as usize;
        dev.read_at(&mut buf[hl..hl + dlen], off + hl as u64)
            .map_err(|e| Error::io(&desc, off + hl as u64, e))?;
        if crc(&buf[hl..hl + dlen]) != h.data_crc {
            report.stop_reason = Some(format!("segment {id}: data checksum mismatch"));
            break;
        }
        for (slot, e) in h.entries.iter().enumerate() {
            index.insert(
                key(e.dev, e.sector / SECTORS_PER_LINE),
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
        last_id = id;
        last_crc = hcrc;
        id += 1;
    }
    Ok(Replay {
        wb_id: start,
        index,
        last_id,
        last_crc,
        report,
    })
}

/// What [`check_device`] found.
#[derive(Clone, Debug)]
pub struct CheckReport {
    /// The newest valid superblock.
    pub superblock: Superblock,
    /// The log walk, as recovery would do it.
    pub log: RecoveryReport,
    /// Dirty lines (and discard records) per backing device id.
    pub dirty_lines: Vec<(u8, u64)>,
}

/// Read-only metadata check of a cache device: reads the superblock and walks the log
/// exactly as recovery would, without writing anything or starting threads.
pub fn check_device(dev: &dyn BlockDevice) -> Result<CheckReport> {
    let sb = probe(dev)?.ok_or_else(|| Error::BadFormat {
        device: dev.describe(),
        reason: "not an lc cache device (no superblock)".into(),
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
    Ok(CheckReport {
        superblock: sb,
        log: r.report,
        dirty_lines,
    })
}

/// True when the slot of segment `id` holds a valid header of exactly that segment of
/// this cache: evidence that the log went on past a segment that failed its checks.
fn next_present(dev: &dyn BlockDevice, sb: &Superblock, id: u64) -> Result<bool> {
    let geo = &sb.geometry;
    let mut buf = AlignedBuf::new(geo.header_len());
    let off = geo.segment_offset(id);
    dev.read_at(&mut buf, off)
        .map_err(|e| Error::io(&dev.describe(), off, e))?;
    Ok(matches!(SegmentHeader::decode(&buf, geo), Ok((h, _)) if h.id == id && h.uuid == sb.uuid))
}

impl Cache {
    /// Opens a formatted cache device with its backing devices, replays the log and
    /// starts the flusher and writeback threads.
    ///
    /// Refused: a device that is not an lc cache or of another format version; dirty
    /// data for a backing device id that is not given, or given with another label.
    pub fn open(
        cache: Arc<dyn BlockDevice>,
        backing: Vec<Backing>,
        opts: OpenOptions,
    ) -> Result<(Cache, RecoveryReport)> {
        let desc = cache.describe();
        let sb = probe(cache.as_ref())?.ok_or_else(|| Error::BadFormat {
            device: desc.clone(),
            reason: "not an lc cache device (no superblock); format it first".into(),
        })?;
        let geo = sb.geometry;
        let needed = geo.segment_size as u64 * (geo.nr_segments + 1);
        if cache.size() < needed {
            return Err(Error::BadFormat {
                device: desc,
                reason: format!(
                    "device is {} bytes but was formatted for {needed}",
                    cache.size()
                ),
            });
        }
        let mut slots: Vec<Option<BackingSlot>> = (0..MAX_BACKING).map(|_| None).collect();
        for b in &backing {
            if b.id as usize >= MAX_BACKING {
                return Err(Error::Invalid(format!("backing device id {} > 254", b.id)));
            }
            if slots[b.id as usize].is_some() {
                return Err(Error::Invalid(format!(
                    "backing device id {} given twice",
                    b.id
                )));
            }
            if b.label.len() > 32 {
                return Err(Error::Invalid(format!(
                    "label {:?} longer than 32 bytes",
                    b.label
                )));
            }
            slots[b.id as usize] = Some(BackingSlot {
                dev: b.dev.clone(),
                label: b.label.clone(),
                dirty: 0,
                needs_flush: false,
            });
        }
        let ram_buffers = opts
            .ram_buffers
            .unwrap_or((64 << 20) / geo.segment_size as usize)
            .max(2);
        let planned =
            ((geo.nr_segments as usize + ram_buffers) * geo.lines_per_segment as usize).max(64);
        let started = Instant::now();
        let r = replay(cache.as_ref(), &sb, planned)?;
        if let Some(reason) = &r.report.stop_reason {
            warn!(opts.logger, "log replay stopped at an invalid segment"; "cache" => &desc, "reason" => reason);
        }
        // Every dirty line must belong to a backing device given now, with its old label.
        for (k, _) in r.index.iter() {
            let (dev, _) = crate::index::unkey(k);
            let old = sb.backing[dev as usize]
                .as_ref()
                .map(|b| b.label.clone())
                .unwrap_or_default();
            match &mut slots[dev as usize] {
                None => {
                    return Err(Error::BadFormat {
                        device: desc,
                        reason: format!(
                            "holds dirty data for backing device {dev} ({old:?}), which is not attached"
                        ),
                    })
                }
                Some(s) if sb.backing[dev as usize].is_some() && s.label != old => {
                    return Err(Error::BadFormat {
                        device: desc,
                        reason: format!(
                            "holds dirty data for backing device {dev} labelled {old:?}, but {:?} was given with that id",
                            s.label
                        ),
                    })
                }
                Some(s) => s.dirty += 1,
            }
        }
        let report = r.report.clone();
        info!(opts.logger, "cache opened"; "cache" => &desc, "segments" => geo.nr_segments,
              "last_writeback_id" => r.wb_id, "replayed_segments" => report.replayed_segments,
              "restored_lines" => report.restored_lines, "ms" => started.elapsed().as_millis() as u64);
        let state = State {
            index: r.index,
            backing: slots,
            open: None,
            next_id: r.last_id + 1,
            ram: BTreeMap::new(),
            pool: (0..ram_buffers)
                .map(|_| AlignedBuf::new(geo.segment_size as usize))
                .collect(),
            ram_buffers,
            prev_crc: r.last_crc,
            write_started_id: r.last_id,
            written_id: r.last_id,
            unflushed_since: None,
            durable_req: 0,
            flushed_id: r.last_id,
            wb_id: r.wb_id,
            sb_seq: sb.seq,
            flush_req: None,
            seal_requested: false,
            need_space: false,
            drains: 0,
            active_writers: 0,
            commit_requested: false,
            tunables: opts.tunables.clone(),
            counters: [0; 16],
            cache_bytes_written: 0,
            backing_bytes_written: 0,
            partial_segments: 0,
            failed: None,
            stop_flush: false,
            stop_writeback: false,
        };
        let inner = Arc::new(Inner {
            cache,
            geo,
            uuid: sb.uuid,
            nonce: random_u64(),
            state: Mutex::new(state),
            io_cv: Condvar::new(),
            worker_cv: Condvar::new(),
            log: opts.logger,
        });
        Ok((Cache::from_inner(inner), report))
    }
}
