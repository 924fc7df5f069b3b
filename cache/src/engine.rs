//! [`Cache`], the engine's user-facing operations: write, read, flush, discard, drain,
//! tunables, stats, close. Opening is in `open.rs`; the state these work on, and the
//! operations the threads share with them, in `state.rs`.
//!
//! Invariants (all under `Inner::state`):
//! - `index` maps every cached (device, line) to its newest copy; a copy's dirty bits
//!   include the dirty bits of every older copy of the same line (partial writes merge).
//! - Segment ids `wb_id < id <= flushed_id` are on the cache device and dirty; ids in
//!   `ram` (sealed, maybe being written) and the open segment are in RAM.
//! - The slot of segment `id` may be written only when `id <= wb_id + nr_segments`,
//!   where `wb_id` is the id persisted in the superblock: a crash never finds a reused
//!   slot that recovery still needs.
//! - A read that found a line on the cache device is valid only if that segment's slot
//!   was not reused meanwhile: `loc.seg + nr_segments > write_started_id`.

use std::os::fd::RawFd;
use std::sync::{Arc, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use slog::{info, warn};

use crate::damage::DamageReport;
use crate::device::BlockDevice;
use crate::error::{Error, Failure, Result};
use crate::format::{
    Entry, Geometry, ENTRY_CLEAN, ENTRY_TOMBSTONE, FULL_LINE, LINE, MAX_BACKING, SECTOR,
    SECTORS_PER_LINE,
};
use crate::index::{key, unkey, Loc};
use crate::iov::{Gather, Scatter};
use crate::linecrc::LineCheck;
use crate::state::{BackingSlot, Inner, Pos, State, MISS_TABLE_MAX};
use crate::stats::{counter_index, Stats};
use crate::tunables::Tunables;

/// A backing device handed to [`Cache::open`].
#[derive(Clone)]
pub struct Backing {
    /// Device id, 0..=254, unique within a cache; recorded with the dirty lines.
    pub id: u8,
    /// The device.
    pub dev: Arc<dyn BlockDevice>,
    /// A label identifying it across restarts (up to 32 bytes; e.g. the LUN name).
    pub label: String,
}

/// Progress of a [`Cache::drain`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DrainProgress {
    /// Dirty lines of the device when the drain started (grows if more arrive).
    pub total: u64,
    /// Dirty lines left.
    pub remaining: u64,
}

/// A cache: one cache device fronting up to 255 backing devices.
pub struct Cache {
    pub(crate) inner: Arc<Inner>,
    threads: Vec<JoinHandle<()>>,
    /// `lc-append-io` (`sidewrite.rs`), stopped last.
    side: Option<JoinHandle<()>>,
    closed: bool,
}

/// Where a read finds one line.
enum Src {
    /// Not cached: the backing device.
    Backing,
    /// Discarded: zeros.
    Zero,
    /// Every wanted sector was in a RAM segment buffer and is in the caller's buffer.
    Copied,
    /// Dirty sectors of a RAM line (a bounce), laid over backing data.
    Ram(Box<[u8; LINE as usize]>, u8),
    /// On the cache device (read into a bounce, laid over backing data).
    Disk(Loc),
    /// On the cache device, read straight into the caller's buffer.
    DiskDirect(Loc),
}

/// The lines a read of `total` (> 0) bytes at `offset` covers, and the caller's part
/// of each.
#[derive(Clone, Copy)]
struct ReadSpan {
    offset: u64,
    end: u64,
    first_line: u64,
    last_line: u64,
}

impl ReadSpan {
    fn new(offset: u64, total: u64) -> ReadSpan {
        let end = offset + total;
        ReadSpan {
            offset,
            end,
            first_line: offset / LINE,
            last_line: (end - 1) / LINE,
        }
    }

    fn lines(&self) -> usize {
        (self.last_line - self.first_line + 1) as usize
    }

    /// The caller's part of line `i` (counted from `first_line`): its position in the
    /// buffers, its offset in the line, its length.
    fn part(&self, i: usize) -> (usize, usize, usize) {
        let ls = (self.first_line + i as u64) * LINE;
        let a = self.offset.max(ls);
        let b = self.end.min(ls + LINE);
        (
            (a - self.offset) as usize,
            (a - ls) as usize,
            (b - a) as usize,
        )
    }

    /// Sectors of line `i` the caller asked for.
    fn wanted(&self, i: usize) -> u8 {
        let (_, in_line, len) = self.part(i);
        sector_mask(in_line as u64 / SECTOR, len as u64 / SECTOR)
    }
}

/// What each line of `plan` read from the cache device is checked against (line key,
/// copy, check), under the engine lock with the plan.
fn line_checks(st: &State, dev: u8, first_line: u64, plan: &[Src]) -> Vec<(u64, Loc, LineCheck)> {
    plan.iter()
        .enumerate()
        .filter_map(|(i, s)| match s {
            Src::Disk(l) => Some((
                key(dev, first_line + i as u64),
                *l,
                st.line_crcs.check(l.seg, l.slot),
            )),
            _ => None,
        })
        .collect()
}

/// A READ whose cache-device reads the caller performs itself (the daemon's io_uring),
/// from [`Cache::start_read`]: every line it covers was in a RAM segment buffer (already
/// copied into the caller's buffers), discarded (already zeroed), or has every wanted
/// sector on the cache device, read by [`DeviceReads::reads`]. Once they all filled
/// their bytes, [`Cache::finish_read`] says whether those bytes are sound.
#[derive(Debug)]
pub struct DeviceReads {
    /// The cache-device reads, runs of lines in consecutive slots merged.
    pub reads: Vec<DeviceRead>,
    dev: u8,
    /// Segments read from: the bytes are sound only if none of their slots was
    /// reused before the reads ended.
    segs: Vec<u64>,
    /// Lines to check: (position in the buffers, line key, copy, crc).
    checks: Vec<(usize, u64, Loc, u32)>,
    /// Access counters, counted when the read is sound.
    counted: Vec<usize>,
}

/// One read of [`DeviceReads`]: `len` bytes at byte `device_offset` of the cache
/// device into the caller's buffers at `pos` (counted through their concatenation).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceRead {
    /// Byte offset on the cache device.
    pub device_offset: u64,
    /// Where the bytes go in the caller's buffers.
    pub pos: usize,
    /// How many bytes.
    pub len: usize,
}

/// The most lines [`Cache::start_read`] hands out for the caller to check itself (64
/// KiB): checking a line costs a crc32c of 4 KiB (0.16 µs with the CPU's crc32
/// instruction, about 12 µs in software, as in the test guest), and a 1 MiB read's 256
/// checks on the daemon's event loop would hold every LUN's commands for that long and
/// serialize large reads on one thread; its workers check them in parallel
/// (`tests/vm/run.sh bigio`, 1 MiB reads of cached data QD4: 281 MiB/s checked on the
/// loop, 347 on the workers, in two boots of equal peer figures).
pub const URING_CHECKED_LINES: usize = 16;

/// Lines a write copies into the open segment per hold of the engine lock (128 KiB):
/// one lock and one clock read per run of lines, and the lock is let go between runs.
const LINES_PER_HOLD: usize = 32;

/// Follows the write streams of device `dev` with a write of `len` bytes at `offset`;
/// whether it should go around the cache: it continues a stream longer than
/// `sequential_cutoff` (0 = never) and the cache is busy, its log at least half
/// `writeback_threshold` dirty (below that a stream is absorbed like any write).
fn follow_write(st: &mut State, nr_segments: u64, dev: u8, offset: u64, len: u64) -> bool {
    let cutoff = st.tunables.sequential_cutoff;
    let long = match st.backing.get_mut(dev as usize).and_then(|b| b.as_mut()) {
        Some(b) if len > 0 => {
            let run = b.wstream.follow(offset, len);
            cutoff > 0 && run > cutoff
        }
        _ => false,
    };
    let half = st.tunables.writeback_threshold as u64 / 2;
    long && st.dirty_log_pct(nr_segments, half) >= half
}

/// One figure of every attached backing device, by id.
fn per_device<T>(st: &State, f: impl Fn(&BackingSlot) -> T) -> Vec<(u8, T)> {
    st.backing
        .iter()
        .enumerate()
        .filter_map(|(i, b)| b.as_ref().map(|b| (i as u8, f(b))))
        .collect()
}

fn sector_mask(first: u64, count: u64) -> u8 {
    debug_assert!(first + count <= SECTORS_PER_LINE && count > 0);
    let m = if count == 8 {
        0xffu16
    } else {
        (1u16 << count) - 1
    };
    (m << first) as u8
}

impl Inner {
    /// Step 1 of a read, under the engine lock: where each line of `sp` is, with its
    /// access counter; a line whose wanted sectors are all in a RAM segment buffer is
    /// copied into `buf` now. A line lost to damage fails the read (`Error::Lost`).
    fn plan_lines(
        &self,
        st: &State,
        dev: u8,
        sp: &ReadSpan,
        buf: &mut Scatter<'_, '_>,
    ) -> Result<(Vec<Src>, Vec<usize>)> {
        let mut plan: Vec<Src> = Vec::with_capacity(sp.lines());
        let mut counted: Vec<usize> = Vec::with_capacity(sp.lines());
        for line in sp.first_line..=sp.last_line {
            let i = (line - sp.first_line) as usize;
            let full = sp.offset <= line * LINE && (line + 1) * LINE <= sp.end;
            let loc = st.index.get(key(dev, line));
            if st.damage.unresolved() && !st.damage.readable(key(dev, line), sp.wanted(i), loc) {
                return Err(Error::Lost {
                    dev,
                    offset: (line * LINE).max(sp.offset),
                });
            }
            let src = match loc {
                None => Src::Backing,
                Some(l) if l.tomb => Src::Zero,
                Some(l) => match self.ram_slice(st, l) {
                    // Every wanted sector is in RAM: to the caller, once.
                    Some(ram) if sp.wanted(i) & !l.dirty == 0 => {
                        let (at, in_line, len) = sp.part(i);
                        buf.copy_from(at, &ram[in_line..in_line + len]);
                        Src::Copied
                    }
                    // Backing data goes under the dirty sectors after the lock is
                    // released: keep them aside (the bounce).
                    Some(_) => match self.ram_line(st, l) {
                        Some(b) => Src::Ram(b, l.dirty),
                        None => Src::Disk(l),
                    },
                    None => Src::Disk(l),
                },
            };
            let (hit, on_ram) = match &src {
                Src::Backing => (false, false),
                Src::Ram(..) | Src::Copied => (true, true),
                _ => (true, false),
            };
            counted.push(counter_index(false, hit, on_ram, full));
            plan.push(src);
        }
        Ok((plan, counted))
    }

    pub(crate) fn slot_reused(&self, st: &State, seg: u64) -> bool {
        seg + self.geo.nr_segments <= st.slot_claimed_id
    }

    /// Line `slot` of an in-RAM segment (open or sealed and not yet released).
    pub(crate) fn ram_slice<'a>(&self, st: &'a State, loc: Loc) -> Option<&'a [u8]> {
        let s = self.geo.data_start() + loc.slot as usize * LINE as usize;
        let buf = match st.open.as_ref().filter(|o| o.id == loc.seg) {
            Some(o) => &o.buf,
            None => &st.ram.get(&loc.seg)?.buf,
        };
        Some(&buf[s..s + LINE as usize])
    }

    /// Copies line `slot` of an in-RAM segment.
    fn ram_line(&self, st: &State, loc: Loc) -> Option<Box<[u8; LINE as usize]>> {
        let mut out = Box::new([0u8; LINE as usize]);
        out.copy_from_slice(self.ram_slice(st, loc)?);
        Some(out)
    }

    /// Deals with the cache-device lines of a read that cannot be checked yet
    /// (`checks`: line key, copy, check): reads the header of each segment whose crcs
    /// are not known ([`crate::logio::load_line_crcs`]) and loses the copies their
    /// header does not list. The read is planned again afterwards.
    fn resolve_checks(&self, checks: &[(u64, Loc, LineCheck)]) -> Result<()> {
        let mut unknown: Vec<u64> = Vec::new();
        let mut unlisted: Vec<(u64, Loc)> = Vec::new();
        for &(k, l, c) in checks {
            match c {
                LineCheck::Unknown if !unknown.contains(&l.seg) => unknown.push(l.seg),
                LineCheck::Unlisted => unlisted.push((k, l)),
                _ => {}
            }
        }
        for seg in unknown {
            crate::logio::load_line_crcs(self, seg)?;
        }
        self.lose_rotten(&unlisted);
        Ok(())
    }

    /// Copies (line key, where) a read found rotten: each still the newest copy of its
    /// line is lost (a clean one dropped), per segment ([`crate::logio::rotten_copies`]).
    fn lose_rotten(&self, copies: &[(u64, Loc)]) {
        let mut segs: Vec<u64> = copies.iter().map(|(_, l)| l.seg).collect();
        segs.sort_unstable();
        segs.dedup();
        for seg in segs {
            let these: Vec<(u64, u16)> = copies
                .iter()
                .filter(|(_, l)| l.seg == seg)
                .map(|&(k, l)| (k, l.slot))
                .collect();
            crate::logio::rotten_copies(self, seg, &these);
        }
    }

    fn read_cache_line(&self, loc: Loc, buf: &mut [u8]) -> Result<()> {
        let off = self.geo.line_offset(loc.seg, loc.slot as u32);
        self.cache
            .read_at(buf, off)
            .map_err(|e| Error::io(&self.cache_desc(), off, e))
    }

    fn check_range(
        &self,
        st: &State,
        dev: u8,
        offset: u64,
        len: u64,
    ) -> Result<Arc<dyn BlockDevice>> {
        let bs = self.geo.block_size as u64;
        if !offset.is_multiple_of(bs) || !len.is_multiple_of(bs) {
            return Err(Error::Invalid(format!(
                "offset {offset} / length {len} not aligned to the {bs}-byte block size"
            )));
        }
        let b = st
            .backing
            .get(dev as usize)
            .and_then(|b| b.as_ref())
            .ok_or_else(|| Error::Invalid(format!("backing device {dev} is not attached")))?;
        match offset.checked_add(len) {
            Some(end) if end <= b.dev.size() => Ok(b.dev.clone()),
            _ => Err(Error::Invalid(format!(
                "range {offset}+{len} beyond the end of backing device {dev} ({} bytes)",
                b.dev.size()
            ))),
        }
    }

    /// Writes the sectors `mask` of one line; `data` holds exactly those sectors (in
    /// the caller's buffers: copied from there into the segment buffer, once).
    /// Returns where the line is in the log (its segment and the lines up to it).
    /// Without `wait`, returns
    /// `Ok(None)` instead of waiting for a RAM buffer or reading older data of a
    /// partial line from the cache device; nothing was changed then.
    /// Called with the engine lock held (`st`), which it may release while it waits;
    /// hands the lock back with the result. `now` is the time the open segment's
    /// `last_write` takes (one clock read per lock hold, not per line).
    #[allow(clippy::too_many_arguments)]
    fn write_line<'a>(
        &'a self,
        mut st: MutexGuard<'a, State>,
        dev: u8,
        line: u64,
        first: u64,
        data: Gather<'_>,
        tomb: bool,
        wait: bool,
        now: Instant,
    ) -> (MutexGuard<'a, State>, Result<Option<Pos>>) {
        let count = data.len() as u64 / SECTOR;
        let mask = if tomb {
            FULL_LINE
        } else {
            sector_mask(first, count)
        };
        let k = key(dev, line);
        // A line read from the cache device while the lock was released.
        let mut fetched: Option<(Loc, Box<[u8; LINE as usize]>)> = None;
        loop {
            if let Some(f) = st.failed.clone() {
                return (st, Err(Error::Failed(f)));
            }
            // Users wait while the segment they would fill lies in the cleaner's reserve.
            if crate::clean::user_must_wait(self, &mut st) || !self.ensure_open(&mut st) {
                if !wait {
                    return (st, Ok(None));
                }
                if let Some(e) = st.stuck_refusal() {
                    return (st, Err(e));
                }
                st = self.wait_io(st, Duration::from_millis(100));
                continue;
            }
            let old = st.index.get(k);
            let (open_id, staged) = st.open.as_ref().map(|o| (o.id, o.staged)).expect("open");
            let hl = self.geo.data_start();
            // Overwrite in place in the open segment (not in lines already on the device).
            if let Some(loc) = old.filter(|l| l.seg == open_id && l.slot as usize >= staged) {
                let o = st.open.as_mut().expect("open");
                let s = hl + loc.slot as usize * LINE as usize;
                let line_buf = &mut o.buf[s..s + LINE as usize];
                let e = &mut o.entries[loc.slot as usize];
                let (dirty, flags) = if tomb {
                    line_buf.fill(0);
                    (0, ENTRY_TOMBSTONE)
                } else {
                    if loc.tomb {
                        line_buf.fill(0);
                    }
                    let at = (first * SECTOR) as usize;
                    data.copy_to(&mut line_buf[at..at + data.len()]);
                    (
                        if loc.tomb {
                            FULL_LINE
                        } else {
                            loc.dirty | mask
                        },
                        0,
                    )
                };
                e.dirty = dirty;
                e.flags = flags;
                // Its crc is taken when its header is encoded (not yet: slot >= staged).
                e.crc = None;
                o.last_write = now;
                st.damage.supersede(k, mask, open_id);
                st.index.insert(
                    k,
                    Loc {
                        dirty,
                        tomb: flags != 0,
                        clean: false,
                        ..loc
                    },
                );
                if loc.clean {
                    // A clean copy became dirty (or a discard record): one dirty line more.
                    if let Some(b) = st.backing[dev as usize].as_mut() {
                        b.dirty += 1;
                    }
                }
                if !tomb {
                    st.count(dev, counter_index(true, true, true, mask == FULL_LINE));
                }
                let pos = Pos {
                    id: open_id,
                    lines: loc.slot as u32 + 1,
                };
                return (st, Ok(Some(pos)));
            }
            // With loss records, a copy that leaves sectors of the line lost must not
            // reach the device before the loss is recorded: a restart from an older
            // checkpoint would take it for the line's newest copy and read the lost
            // sectors from the backing device (docs/FORMAT.md, "Loss records").
            if st.damage.unrecorded_loss(k, mask) {
                if st.record_failed {
                    return (
                        st,
                        Err(Error::Lost {
                            dev,
                            offset: line * LINE,
                        }),
                    );
                }
                if !wait {
                    return (st, Ok(None));
                }
                self.worker_cv.notify_all();
                st = self.wait_io(st, Duration::from_millis(10));
                continue;
            }
            // Older data this partial write must keep (never sectors lost to damage).
            let Some(keep) = st.damage.mergeable(k, old, mask) else {
                let lost = Error::Lost {
                    dev,
                    offset: line * LINE,
                };
                return (st, Err(lost));
            };
            let mut base: Option<Box<[u8; LINE as usize]>> = None;
            let mut base_bits = 0u8;
            if !tomb && mask != FULL_LINE {
                if let Some(loc) = old {
                    if loc.tomb {
                        base = Some(Box::new([0u8; LINE as usize]));
                        base_bits = keep;
                    } else if keep & !mask != 0 {
                        if let Some(b) = self.ram_line(&st, loc) {
                            base = Some(b);
                        } else if let Some((_, b)) = fetched.take().filter(|(l, _)| *l == loc) {
                            base = Some(b);
                        } else {
                            if !wait {
                                return (st, Ok(None));
                            }
                            let check = st.line_crcs.check(loc.seg, loc.slot);
                            drop(st);
                            let mut b = Box::new([0u8; LINE as usize]);
                            let r = match check {
                                LineCheck::Crc(_) | LineCheck::Unchecked => {
                                    self.read_cache_line(loc, &mut b[..])
                                }
                                _ => self.resolve_checks(&[(k, loc, check)]),
                            };
                            st = self.lock();
                            if let Err(e) = r {
                                return (st, Err(e));
                            }
                            if matches!(check, LineCheck::Unknown | LineCheck::Unlisted)
                                || self.slot_reused(&st, loc.seg)
                            {
                                continue;
                            }
                            if matches!(check, LineCheck::Crc(c) if c != crate::format::crc(&b[..]))
                            {
                                // Merged into a new copy, rotten sectors would get a
                                // fresh crc: the copy is lost (or dropped, if clean).
                                drop(st);
                                crate::logio::rotten_copies(self, loc.seg, &[(k, loc.slot)]);
                                st = self.lock();
                                continue;
                            }
                            fetched = Some((loc, b));
                            continue;
                        }
                        base_bits = keep;
                    }
                }
            }
            let o = st.open.as_mut().expect("open");
            let slot = o.entries.len();
            let s = hl + slot * LINE as usize;
            let line_buf = &mut o.buf[s..s + LINE as usize];
            match &base {
                Some(b) => line_buf.copy_from_slice(&b[..]),
                None => line_buf.fill(0),
            }
            let (dirty, flags) = if tomb {
                (0, ENTRY_TOMBSTONE)
            } else {
                let at = (first * SECTOR) as usize;
                data.copy_to(&mut line_buf[at..at + data.len()]);
                (base_bits | mask, 0)
            };
            o.entries.push(Entry {
                sector: line * SECTORS_PER_LINE,
                dev,
                dirty,
                flags,
                crc: None,
            });
            o.last_write = now;
            self.kick_stager(&st);
            let loc = Loc {
                seg: open_id,
                slot: slot as u16,
                dirty,
                tomb,
                clean: false,
            };
            st.damage.supersede(k, mask, open_id);
            // A new dirty line: none was cached, or only a clean copy.
            if st.index.insert(k, loc).is_none_or(|o| o.clean) {
                if let Some(b) = st.backing[dev as usize].as_mut() {
                    b.dirty += 1;
                }
            }
            if !tomb {
                let on_ram = old.is_some_and(|l| st.ram.contains_key(&l.seg));
                st.count(
                    dev,
                    counter_index(true, old.is_some(), on_ram, mask == FULL_LINE),
                );
            }
            let pos = Pos {
                id: open_id,
                lines: slot as u32 + 1,
            };
            return (st, Ok(Some(pos)));
        }
    }

    /// Read caching: appends lines of backing device `dev` that a read just served from
    /// it (whole lines, uncached when the read planned, `epoch` = the index's removal
    /// count then) to the open segment as clean copies, each at its
    /// `read_promote_threshold`-th miss. Never waits: a line that does not fit now is
    /// not promoted. `cands` holds (line, its position in `buf`).
    ///
    /// Nothing is promoted when the backing data may have changed since the plan: an
    /// entry was removed meanwhile (writeback wrote a newer copy and dropped it, the
    /// cleaner dropped a clean copy, a device was detached) or a discard went to the
    /// backing device (`discards`, and [`crate::index::Index::invalidate`] after it);
    /// and a line that has an entry now (a write or discard came in) keeps it.
    fn promote(&self, dev: u8, epoch: u64, buf: &mut Scatter<'_, '_>, cands: &[(u64, usize)]) {
        let mut st = self.lock();
        let threshold = st.tunables.read_promote_threshold;
        // Attached, and every discard passed to it durable there.
        let settled = st
            .backing
            .get(dev as usize)
            .and_then(|b| b.as_ref())
            .is_some_and(|b| b.changes_issued == b.changes_flushed);
        if threshold == 0
            || !settled
            || st.failed.is_some()
            || st.stop_flush
            || st.discards > 0
            || !st.bypassing.is_empty()
            || st.index.removals() != epoch
        {
            return;
        }
        let hl = self.geo.data_start();
        for &(line, at) in cands {
            let k = key(dev, line);
            // Not a line lost to damage (or of unknown content): a clean copy replayed
            // at a restart would make it readable again.
            if st.index.get(k).is_some() || !st.damage.readable(k, FULL_LINE, None) {
                continue;
            }
            if threshold > 1 {
                if st.misses.len() >= MISS_TABLE_MAX && !st.misses.contains_key(&k) {
                    st.misses.clear();
                }
                let n = st.misses.entry(k).or_insert(0);
                *n += 1;
                if *n < threshold {
                    continue;
                }
                st.misses.remove(&k);
            }
            // Log space goes to writers first: no promotion under pressure, in the
            // reserve, or when a segment buffer is not free now.
            if st.need_space || crate::clean::in_reserve(self, &st) || !self.ensure_open(&mut st) {
                return;
            }
            let o = st.open.as_mut().expect("open");
            let slot = o.entries.len();
            let s = hl + slot * LINE as usize;
            let line_buf = &mut o.buf[s..s + LINE as usize];
            buf.for_each(at, LINE as usize, |off, piece| {
                line_buf[off..off + piece.len()].copy_from_slice(piece)
            });
            o.entries.push(Entry {
                sector: line * SECTORS_PER_LINE,
                dev,
                dirty: FULL_LINE,
                flags: ENTRY_CLEAN,
                crc: None,
            });
            let seg = o.id;
            self.kick_stager(&st);
            st.index.insert(
                k,
                Loc {
                    seg,
                    slot: slot as u16,
                    dirty: FULL_LINE,
                    tomb: false,
                    clean: true,
                },
            );
            st.promoted_lines += 1;
            if let Some(b) = st.backing[dev as usize].as_mut() {
                b.promoted += 1;
                b.may_hold_clean = true;
            }
        }
    }
}

impl Cache {
    pub(crate) fn from_inner(inner: Arc<Inner>) -> Cache {
        let mut threads = Vec::new();
        let i = inner.clone();
        threads.push(
            std::thread::Builder::new()
                .name("lc-flush".into())
                .spawn(move || crate::flush::run(&i))
                .expect("spawn lc-flush"),
        );
        let i = inner.clone();
        threads.push(
            std::thread::Builder::new()
                .name("lc-writeback".into())
                .spawn(move || crate::writeback::run(&i))
                .expect("spawn lc-writeback"),
        );
        let i = inner.clone();
        threads.push(
            std::thread::Builder::new()
                .name("lc-checkpoint".into())
                .spawn(move || crate::checkpoint::run(&i))
                .expect("spawn lc-checkpoint"),
        );
        let i = inner.clone();
        let side = std::thread::Builder::new()
            .name("lc-append-io".into())
            .spawn(move || i.side.run(&*i.cache))
            .expect("spawn lc-append-io");
        Cache {
            inner,
            threads,
            side: Some(side),
            closed: false,
        }
    }

    /// The cache's geometry.
    pub fn geometry(&self) -> Geometry {
        self.inner.geo
    }

    /// Size in bytes of backing device `dev`, if attached.
    pub fn backing_size(&self, dev: u8) -> Option<u64> {
        let st = self.inner.lock();
        st.backing
            .get(dev as usize)
            .and_then(|b| b.as_ref())
            .map(|b| b.dev.size())
    }

    /// Writes `data` at byte `offset` of backing device `dev` through the cache.
    /// Completes once the data is in RAM; with `fua`, once it is durable on the cache
    /// device. [`Cache::write_vectored`] with one slice.
    pub fn write(&self, dev: u8, offset: u64, data: &[u8], fua: bool) -> Result<()> {
        self.write_vectored(dev, offset, &[data], fua)
    }

    /// Writes the concatenation of `data` at byte `offset` of backing device `dev`, as
    /// [`Cache::write`] does: each line's bytes are copied from the slices straight into
    /// the open segment's buffer (a line may span slices), with no staging copy. The
    /// total length must be a multiple of the block size; the slices need not be.
    ///
    /// A write that continues a sequential stream longer than `sequential_cutoff` goes
    /// around the cache to the backing device instead (write-around, see
    /// [`Cache::bypass`]) when none of its lines is cached.
    pub fn write_vectored(&self, dev: u8, offset: u64, data: &[&[u8]], fua: bool) -> Result<()> {
        let pieces = data;
        let data = Gather::new(data);
        let len = data.len() as u64;
        let mut st = self.inner.lock();
        self.inner.check_range(&st, dev, offset, len)?;
        if let Some(e) = st.backing_refusal(dev) {
            return Err(e);
        }
        if follow_write(&mut st, self.inner.geo.nr_segments, dev, offset, len) {
            drop(st);
            if let Some(r) = self.bypass(dev, offset, pieces, fua) {
                return r;
            }
            st = self.inner.lock();
        }
        // After a write going around the cache over the same bytes, not beside it.
        while st.bypass_overlaps(dev, offset, len) {
            st = self.inner.wait_io(st, Duration::from_millis(100));
        }
        st.active_writers += 1;
        drop(st);
        let r = self.write_lines(dev, offset, data, true);
        self.inner.lock().active_writers -= 1;
        let last = r?.expect("a waiting write completes");
        if fua && last.id > 0 {
            self.inner.wait_durable(last)?;
        }
        Ok(())
    }

    /// Writes line by line; `Ok(None)` when a line would have to wait and `wait` is
    /// off (earlier lines are written then, with the caller's data).
    fn write_lines(
        &self,
        dev: u8,
        offset: u64,
        data: Gather<'_>,
        wait: bool,
    ) -> Result<Option<Pos>> {
        let mut last = Pos::default();
        let mut pos = 0usize;
        let mut rest = data;
        let mut st = self.inner.lock();
        let mut now = Instant::now();
        let mut held = 0;
        while rest.len() > 0 {
            if held == LINES_PER_HOLD {
                // Let the flusher and readers in between runs of lines.
                drop(st);
                st = self.inner.lock();
                now = Instant::now();
                held = 0;
            }
            let off = offset + pos as u64;
            let line = off / LINE;
            let in_line = off % LINE;
            let n = ((LINE - in_line) as usize).min(rest.len());
            let (piece, after) = rest.split_at(n);
            let (g, r) =
                self.inner
                    .write_line(st, dev, line, in_line / SECTOR, piece, false, wait, now);
            st = g;
            let Some(at) = r? else {
                return Ok(None);
            };
            last = last.max(at);
            held += 1;
            pos += n;
            rest = after;
        }
        Ok(Some(last))
    }

    /// [`Cache::write`] without FUA that never blocks: `None` when it would have to
    /// wait (no free RAM buffer, or a partial line whose older sectors are on the cache
    /// device). Lines written before that point hold the caller's data; the caller
    /// completes the request with [`Cache::write`], which rewrites them.
    pub fn try_write(&self, dev: u8, offset: u64, data: &[u8]) -> Option<Result<()>> {
        self.try_write_vectored(dev, offset, &[data])
    }

    /// [`Cache::try_write`] of the concatenation of `data`, copied as
    /// [`Cache::write_vectored`] copies it.
    pub fn try_write_vectored(&self, dev: u8, offset: u64, data: &[&[u8]]) -> Option<Result<()>> {
        let data = Gather::new(data);
        let len = data.len() as u64;
        {
            let mut st = self.inner.lock();
            if let Err(e) = self.inner.check_range(&st, dev, offset, len) {
                return Some(Err(e));
            }
            if let Some(e) = st.backing_refusal(dev) {
                return Some(Err(e));
            }
            // A write going around the cache, or one that must wait for such a write,
            // blocks: [`Cache::write_vectored`] does it.
            if follow_write(&mut st, self.inner.geo.nr_segments, dev, offset, len)
                || st.bypass_overlaps(dev, offset, len)
            {
                return None;
            }
            st.active_writers += 1;
        }
        let r = self.write_lines(dev, offset, data, false);
        self.inner.lock().active_writers -= 1;
        match r {
            Ok(Some(_)) => Some(Ok(())),
            Ok(None) => None,
            Err(e) => Some(Err(e)),
        }
    }

    /// Write-around: writes `data` at `offset` straight to backing device `dev` (and
    /// flushes it for `fua`), when that cannot leave a stale copy anywhere: no line of
    /// the range is cached (dirty, clean or discarded), lost to damage, or being
    /// written around already. A line without an entry has no copy in any segment
    /// recovery would replay (entries leave the index only when superseded, or with
    /// their segment at or below `last_writeback_id`), so nothing written around is
    /// undone by a crash. While it runs, cached writes and discards overlapping it wait
    /// and no read miss is promoted; promotions planned before its end are dropped
    /// (their backing read may predate it). `None` when it cannot go around now, or
    /// the backing device failed it: the caller writes through the cache instead (a
    /// failing backing device does not lose the write).
    fn bypass(&self, dev: u8, offset: u64, data: &[&[u8]], fua: bool) -> Option<Result<()>> {
        let len: u64 = data.iter().map(|p| p.len() as u64).sum();
        let (l0, l1) = (offset / LINE, (offset + len).div_ceil(LINE));
        let backing = {
            let mut st = self.inner.lock();
            let b = st.backing.get(dev as usize)?.as_ref()?;
            let eligible = st.failed.is_none()
                && !st.stop_flush
                && st.damage.unknown_upto == 0
                && b.failing.is_none()
                && !st.bypass_overlaps(dev, offset, len)
                && st
                    .damage
                    .lost
                    .range(key(dev, l0)..key(dev, l1))
                    .next()
                    .is_none()
                && (l0..l1).all(|l| st.index.get(key(dev, l)).is_none());
            if !eligible {
                return None;
            }
            let d = b.dev.clone();
            st.bypassing.push(crate::state::Bypass {
                dev,
                start: offset,
                end: offset + len,
            });
            d
        };
        let r = backing.write_vectored_at(data, offset).and_then(|()| {
            if fua {
                backing.flush()
            } else {
                Ok(())
            }
        });
        let mut st = self.inner.lock();
        if let Some(i) = st
            .bypassing
            .iter()
            .position(|b| b.dev == dev && b.start == offset && b.end == offset + len)
        {
            st.bypassing.swap_remove(i);
        }
        st.index.invalidate();
        if r.is_ok() {
            st.bypassed_bytes += len;
        }
        if let Some(b) = st.backing[dev as usize].as_mut() {
            // Not durable on the device until a flush of it: no promotion till then.
            b.changes_issued += 1;
            if r.is_ok() {
                b.bypassed_bytes += len;
                b.bypassed_writes += 1;
            }
        }
        self.inner.io_cv.notify_all();
        match r {
            Ok(()) => Some(Ok(())),
            Err(e) => {
                warn!(self.inner.log, "a write around the cache failed; it goes through the cache";
                      "device" => backing.describe(), "offset" => offset, "len" => len, "error" => %e);
                None
            }
        }
    }

    /// [`Cache::read`] that never blocks: `None` when it would have to wait for a
    /// device (a line neither in a RAM segment buffer nor readable without waiting,
    /// e.g. not in the page cache).
    pub fn try_read(&self, dev: u8, offset: u64, buf: &mut [u8]) -> Option<Result<()>> {
        self.try_read_vectored(dev, offset, &mut [buf])
    }

    /// [`Cache::try_read`] into the concatenation of `bufs`, filled as
    /// [`Cache::read_vectored`] fills it.
    pub fn try_read_vectored(
        &self,
        dev: u8,
        offset: u64,
        bufs: &mut [&mut [u8]],
    ) -> Option<Result<()>> {
        self.read_impl(dev, offset, &mut Scatter::new(bufs), false)
            .transpose()
    }

    /// Reads `buf.len()` bytes at byte `offset` of backing device `dev`.
    /// [`Cache::read_vectored`] with one buffer.
    pub fn read(&self, dev: u8, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.read_vectored(dev, offset, &mut [buf])
    }

    /// Reads into the concatenation of `bufs` (total length a multiple of the block
    /// size) from byte `offset` of backing device `dev`, with one copy per byte and no
    /// staging buffer for the request:
    /// - a line whose wanted sectors are all in a RAM segment buffer is copied from it
    ///   (under the engine lock);
    /// - backing data is read from the backing device straight into the buffers (a run
    ///   of lines that spans several buffers is read piece by piece);
    /// - a line whose wanted sectors are all dirty on the cache device is read from it
    ///   straight into the buffers when its part lies inside one buffer.
    ///
    /// Lines that mix dirty sectors with backing data (partial lines: their cached
    /// sectors are laid over the backing read) and cache-device lines that straddle two
    /// buffers go through a 4 KiB bounce: one line read and copied, cheaper than
    /// splitting the device read.
    pub fn read_vectored(&self, dev: u8, offset: u64, bufs: &mut [&mut [u8]]) -> Result<()> {
        self.read_impl(dev, offset, &mut Scatter::new(bufs), true)
            .map(|r| r.expect("a waiting read completes"))
    }

    /// The cache device's file descriptor for [`Cache::start_read`]'s reads, with the
    /// alignment their buffers need (its `O_DIRECT` alignment, or 1); `None` when the
    /// device has none (then every read goes through [`Cache::read_vectored`]).
    pub fn cache_fd(&self) -> Option<(RawFd, usize)> {
        self.inner.cache.read_fd()
    }

    /// Starts a read of the concatenation of `bufs` (as [`Cache::read_vectored`] fills
    /// it) whose cache-device reads the caller performs itself, e.g. all at once through
    /// io_uring: lines in RAM are copied and discarded lines zeroed now, and the reads
    /// of lines on the cache device are returned. `Ok(None)` (nothing counted, nothing
    /// to undo) when the read needs anything else: backing data (a miss, a partial
    /// line), a bounce, or anything lost to damage; [`Cache::read_vectored`] serves it
    /// then. The caller must call [`Cache::finish_read`] once every read filled its
    /// bytes, and read again with [`Cache::read_vectored`] when it says no or a read
    /// failed (the plan does not say what an error means for the LUN; the full read
    /// does).
    pub fn start_read(
        &self,
        dev: u8,
        offset: u64,
        bufs: &mut [&mut [u8]],
    ) -> Result<Option<DeviceReads>> {
        let inner = &self.inner;
        let mut buf = Scatter::new(bufs);
        let total = buf.len() as u64;
        if total == 0 {
            return Ok(None);
        }
        let sp = ReadSpan::new(offset, total);
        let mut st = inner.lock();
        inner.check_range(&st, dev, offset, total)?;
        let (plan, counted) = match inner.plan_lines(&st, dev, &sp, &mut buf) {
            // The full read reports the loss.
            Err(Error::Lost { .. }) => return Ok(None),
            r => r?,
        };
        let mut reads: Vec<DeviceRead> = Vec::new();
        let mut segs: Vec<u64> = Vec::new();
        let mut checks: Vec<(usize, u64, Loc, u32)> = Vec::new();
        for (i, s) in plan.iter().enumerate() {
            let (at, in_line, len) = sp.part(i);
            match s {
                Src::Copied => {}
                Src::Zero => buf.zero(at, len),
                // Whole lines whose crc is known (or which have none to check).
                Src::Disk(l) if sp.wanted(i) & !l.dirty == 0 && len == LINE as usize => {
                    match st.line_crcs.check(l.seg, l.slot) {
                        LineCheck::Crc(c) => {
                            checks.push((at, key(dev, sp.first_line + i as u64), *l, c))
                        }
                        LineCheck::Unchecked => {}
                        LineCheck::Unknown | LineCheck::Unlisted => return Ok(None),
                    }
                    let from = inner.geo.line_offset(l.seg, l.slot as u32) + in_line as u64;
                    match reads.last_mut() {
                        Some(r)
                            if r.pos + r.len == at && r.device_offset + r.len as u64 == from =>
                        {
                            r.len += len
                        }
                        _ => reads.push(DeviceRead {
                            device_offset: from,
                            pos: at,
                            len,
                        }),
                    }
                    if !segs.contains(&l.seg) {
                        segs.push(l.seg);
                    }
                }
                _ => return Ok(None),
            }
        }
        // The caller checks the lines on its own thread (the daemon's event loop, shared
        // by every LUN): a long read is left to a worker, which checks its lines on its
        // own (docs/DESIGN.md, "Line checks on reads").
        if checks.len() > URING_CHECKED_LINES {
            return Ok(None);
        }
        // The read counts for the device's streams as one served here would.
        if let Some(b) = st.backing[dev as usize].as_mut() {
            b.stream.follow(offset, total);
        }
        Ok(Some(DeviceReads {
            reads,
            dev,
            segs,
            checks,
            counted,
        }))
    }

    /// Ends a read begun by [`Cache::start_read`] after every one of its reads filled
    /// its bytes in `bufs` (the buffers given to it): `true` when they are sound (no
    /// slot they came from was reused for a newer segment meanwhile, and every line
    /// matches its crc; the read is counted), `false` when the read must be done again
    /// with [`Cache::read_vectored`] (a rotten line is dealt with first, so that read
    /// reports its loss).
    pub fn finish_read(&self, r: DeviceReads, bufs: &[&[u8]]) -> bool {
        let inner = &self.inner;
        // Checked outside the lock; bytes from a slot reused meanwhile are refused below
        // whatever their crc (a reuse is never undone).
        let all = Gather::new(bufs);
        let rotten: Vec<(u64, Loc)> = r
            .checks
            .iter()
            .filter(|&&(at, _, _, want)| all.split_at(at).1.split_at(LINE as usize).0.crc() != want)
            .map(|&(_, k, l, _)| (k, l))
            .collect();
        let mut st = inner.lock();
        if r.segs.iter().any(|&seg| inner.slot_reused(&st, seg)) {
            return false;
        }
        if !rotten.is_empty() {
            drop(st);
            inner.lose_rotten(&rotten);
            return false;
        }
        for c in r.counted {
            st.count(r.dev, c);
        }
        true
    }

    /// The read path; without `wait`, `Ok(None)` as soon as a device read would block.
    fn read_impl(
        &self,
        dev: u8,
        offset: u64,
        buf: &mut Scatter<'_, '_>,
        wait: bool,
    ) -> Result<Option<()>> {
        let inner = &self.inner;
        let total = buf.len() as u64;
        let (backing, promoting) = {
            let mut st = inner.lock();
            let backing = inner.check_range(&st, dev, offset, total)?;
            // Reads that continue a long sequential stream are not promoted.
            let t = &st.tunables;
            let (threshold, cutoff) = (t.read_promote_threshold, t.sequential_cutoff);
            let stream = match st.backing[dev as usize].as_mut() {
                Some(b) if total > 0 => b.stream.follow(offset, total),
                _ => 0,
            };
            (backing, threshold > 0 && (cutoff == 0 || stream <= cutoff))
        };
        if total == 0 {
            return Ok(Some(()));
        }
        // A device read; `None` when it would block and blocking is not allowed.
        let dev_read =
            |d: &dyn BlockDevice, b: &mut [u8], off: u64| -> Option<std::io::Result<()>> {
                if wait {
                    Some(d.read_at(b, off))
                } else {
                    d.try_read_at(b, off)
                }
            };
        let sp = ReadSpan::new(offset, total);
        let first_line = sp.first_line;
        let span = |i: usize| sp.part(i);
        let wanted = |i: usize| sp.wanted(i);
        'retry: loop {
            // 1. Plan every line under the lock; copy RAM-resident data now.
            let epoch;
            let (mut plan, counted, checks) = {
                let st = inner.lock();
                epoch = st.index.removals();
                let (plan, counted) = inner.plan_lines(&st, dev, &sp, buf)?;
                let checks = line_checks(&st, dev, first_line, &plan);
                (plan, counted, checks)
            };
            // Segments whose line crcs are not known yet, and copies with none.
            if checks
                .iter()
                .any(|c| matches!(c.2, LineCheck::Unknown | LineCheck::Unlisted))
            {
                if !wait {
                    return Ok(None);
                }
                inner.resolve_checks(&checks)?;
                continue 'retry;
            }
            // 2. Backing reads for every run of lines that needs backing data, straight
            // into the caller's buffers (a piece per buffer the run covers).
            let needs_backing = |i: usize, s: &Src| match s {
                Src::Backing => true,
                Src::Zero | Src::Copied | Src::DiskDirect(_) => false,
                Src::Ram(_, d) => wanted(i) & !*d != 0,
                Src::Disk(l) => wanted(i) & !l.dirty != 0,
            };
            let mut i = 0;
            while i < plan.len() {
                if !needs_backing(i, &plan[i]) {
                    i += 1;
                    continue;
                }
                let mut j = i;
                while j + 1 < plan.len() && needs_backing(j + 1, &plan[j + 1]) {
                    j += 1;
                }
                let (at, _, _) = span(i);
                let (at_j, _, len_j) = span(j);
                let mut res: Option<std::io::Result<()>> = Some(Ok(()));
                let mut failed_at = offset + at as u64;
                buf.for_each(at, at_j + len_j - at, |o, piece| {
                    if matches!(res, Some(Ok(()))) {
                        failed_at = offset + (at + o) as u64;
                        res = dev_read(backing.as_ref(), piece, failed_at);
                    }
                });
                let Some(r) = res else {
                    return Ok(None);
                };
                r.map_err(|e| Error::io(&backing.describe(), failed_at, e))?;
                i = j + 1;
            }
            // 3. Cache-device reads for lines that live there. A run of lines whose
            // wanted sectors are all dirty and which lie in consecutive slots of one
            // segment is one read per buffer piece, straight into the caller's buffers
            // (a 1 MiB READ of lines written together is a handful of reads, not 256);
            // any other line is read whole into a bounce.
            let mut disk: Vec<(usize, Box<[u8; LINE as usize]>)> = Vec::new();
            let on_disk = plan
                .iter()
                .any(|s| matches!(s, Src::Disk(_) | Src::DiskDirect(_)));
            // A whole line: its crc is checked over the caller's buffers.
            let direct = |i: usize, s: &Src| match s {
                Src::Disk(l) if wanted(i) & !l.dirty == 0 && span(i).2 == LINE as usize => Some(*l),
                _ => None,
            };
            let mut i = 0;
            while i < plan.len() {
                let Src::Disk(l) = plan[i] else {
                    i += 1;
                    continue;
                };
                let off = inner.geo.line_offset(l.seg, l.slot as u32);
                if direct(i, &plan[i]).is_some() {
                    let mut j = i;
                    while let Some(next) = plan.get(j + 1).and_then(|s| direct(j + 1, s)) {
                        let Src::Disk(prev) = plan[j] else { break };
                        if next.seg != prev.seg || next.slot != prev.slot + 1 {
                            break;
                        }
                        j += 1;
                    }
                    let (at, in_line, _) = span(i);
                    let (at_j, _, len_j) = span(j);
                    let from = off + in_line as u64;
                    let mut res: Option<std::io::Result<()>> = Some(Ok(()));
                    let mut failed_at = from;
                    buf.for_each(at, at_j + len_j - at, |o, piece| {
                        if matches!(res, Some(Ok(()))) {
                            failed_at = from + o as u64;
                            res = dev_read(inner.cache.as_ref(), piece, failed_at);
                        }
                    });
                    let Some(r) = res else {
                        return Ok(None);
                    };
                    r.map_err(|e| Error::io(&inner.cache_desc(), failed_at, e))?;
                    for s in &mut plan[i..=j] {
                        if let Src::Disk(l) = *s {
                            *s = Src::DiskDirect(l);
                        }
                    }
                    i = j + 1;
                    continue;
                }
                let mut b = Box::new([0u8; LINE as usize]);
                let Some(r) = dev_read(inner.cache.as_ref(), &mut b[..], off) else {
                    return Ok(None);
                };
                r.map_err(|e| Error::io(&inner.cache_desc(), off, e))?;
                disk.push((i, b));
                i += 1;
            }
            // Every line read from the cache device against its crc.
            let mut rotten: Vec<(u64, Loc)> = Vec::new();
            for &(k, l, c) in &checks {
                let LineCheck::Crc(want) = c else { continue };
                let i = (unkey(k).1 - first_line) as usize;
                let got = match &plan[i] {
                    Src::DiskDirect(_) => buf.crc(span(i).0, LINE as usize),
                    Src::Disk(_) => {
                        let b = disk.iter().find(|(j, _)| *j == i).expect("bounce");
                        crate::format::crc(&b.1[..])
                    }
                    _ => continue,
                };
                if got != want {
                    rotten.push((k, l));
                }
            }
            {
                let mut st = inner.lock();
                if on_disk {
                    for s in &plan {
                        if let Src::Disk(l) | Src::DiskDirect(l) = s {
                            if inner.slot_reused(&st, l.seg) {
                                // Everything is read again: every byte of the range
                                // is rewritten by the next pass.
                                continue 'retry;
                            }
                        }
                    }
                }
                if rotten.is_empty() {
                    for c in counted {
                        st.count(dev, c);
                    }
                }
            }
            if !rotten.is_empty() {
                // Planned again once the copies are dealt with: a dirty one's sectors
                // then fail as lost, a clean one's come from the backing device.
                inner.lose_rotten(&rotten);
                continue 'retry;
            }
            // Whole lines read from the backing device: candidates for promotion.
            let full = |i: usize| span(i).2 == LINE as usize;
            let promote: Vec<(u64, usize)> = if promoting {
                plan.iter()
                    .enumerate()
                    .filter(|&(i, s)| matches!(s, Src::Backing) && full(i))
                    .map(|(i, _)| (first_line + i as u64, span(i).0))
                    .collect()
            } else {
                Vec::new()
            };
            // 4. Overlay cached sectors kept aside, and discarded lines.
            let mut disk_iter = disk.into_iter();
            for (i, s) in plan.into_iter().enumerate() {
                let (at, in_line, len) = span(i);
                let (data, bits): (Box<[u8; LINE as usize]>, u8) = match s {
                    Src::Backing | Src::Copied | Src::DiskDirect(_) => continue,
                    Src::Zero => {
                        buf.zero(at, len);
                        continue;
                    }
                    Src::Ram(b, d) => (b, d),
                    Src::Disk(l) => (disk_iter.next().expect("disk line").1, l.dirty),
                };
                for sec in (in_line as u64 / SECTOR)..((in_line + len) as u64 / SECTOR) {
                    if bits & (1 << sec) == 0 {
                        continue;
                    }
                    let lo = (sec * SECTOR) as usize;
                    buf.copy_from(at + lo - in_line, &data[lo..lo + SECTOR as usize]);
                }
            }
            // 5. Promotion (read caching): after the backing data is in the buffers.
            if !promote.is_empty() {
                inner.promote(dev, epoch, buf, &promote);
            }
            return Ok(Some(()));
        }
    }

    /// Makes every write completed before this call durable (SCSI SYNCHRONIZE CACHE).
    pub fn flush(&self) -> Result<()> {
        let target = self.inner.lock().last_written_pos();
        self.inner.flush_backing()?;
        self.inner.wait_durable(target)
    }

    /// Discards a range: cached lines in it are dropped (dirty ones too, through discard
    /// records in the log) and the discard is passed to the backing device. Afterwards
    /// the range reads as zeros.
    pub fn discard(&self, dev: u8, offset: u64, len: u64) -> Result<()> {
        let backing = {
            let mut st = self.inner.lock();
            let b = self.inner.check_range(&st, dev, offset, len)?;
            // After a write going around the cache over the same bytes, not beside it.
            while st.bypass_overlaps(dev, offset, len) {
                st = self.inner.wait_io(st, Duration::from_millis(100));
            }
            b
        };
        if len == 0 {
            return Ok(());
        }
        let end = offset + len;
        let full_start = offset.div_ceil(LINE) * LINE;
        let full_end = end / LINE * LINE;
        // Partial lines at either end are written as zeros through the log.
        if full_start >= full_end {
            self.write(dev, offset, &vec![0u8; len as usize], false)?;
            return Ok(());
        }
        let zeros = vec![0u8; LINE as usize];
        if offset < full_start {
            self.write(dev, offset, &zeros[..(full_start - offset) as usize], false)?;
        }
        if full_end < end {
            self.write(dev, full_end, &zeros[..(end - full_end) as usize], false)?;
        }
        let (l0, l1) = (full_start / LINE, full_end / LINE);
        // Lines with a cached copy, and lines lost to damage (a discard record makes
        // them read as zeros, like the rest of the range).
        // The backing data changes under reads of uncached lines: from the moment the
        // cached lines are listed (a line promoted after that would get no discard
        // record) no promotion is inserted, nor after the discard for reads planned
        // before its end (the invalidation), so a stale clean copy never appears.
        let sync_first;
        let cached: Vec<u64> = {
            let mut st = self.inner.lock();
            st.discards += 1;
            let lost = st
                .damage
                .lost
                .range(key(dev, l0)..key(dev, l1))
                .map(|(&k, _)| unkey(k).1);
            let mut v: Vec<u64> = if l1 - l0 <= st.index.len() as u64 {
                (l0..l1)
                    .filter(|&l| st.index.get(key(dev, l)).is_some())
                    .collect()
            } else {
                st.index
                    .iter()
                    .map(|(k, _)| unkey(k))
                    .filter(|&(d, l)| d == dev && l >= l0 && l < l1)
                    .map(|(_, l)| l)
                    .collect()
            };
            v.extend(lost);
            v.sort_unstable();
            v.dedup();
            sync_first = !v.is_empty()
                && st.backing[dev as usize]
                    .as_ref()
                    .is_some_and(|b| b.may_hold_clean);
            v
        };
        let r = (|| {
            let mut last = Pos::default();
            for line in cached {
                let st = self.inner.lock();
                let (st, r) = self.inner.write_line(
                    st,
                    dev,
                    line,
                    0,
                    Gather::new(&[]),
                    true,
                    true,
                    Instant::now(),
                );
                drop(st);
                last = last.max(r?.expect("a waiting write completes"));
            }
            // A clean copy is not written back: if the discard reached the backing
            // device and its discard records did not survive a crash, a replayed
            // clean copy (the newest entry, or an older one under a newer copy lost
            // with the records) would read old data until dropped, then the zeros.
            // The records are made durable first.
            if sync_first {
                self.inner.wait_durable(last)?;
            }
            backing
                .discard(full_start, full_end - full_start)
                .map_err(|e| Error::io(&backing.describe(), full_start, e))
        })();
        let mut st = self.inner.lock();
        st.discards -= 1;
        st.index.invalidate();
        // Counted failed too: a discard the device failed may have taken effect in
        // part, and is not durable before a flush of it either.
        if let Some(b) = st.backing[dev as usize].as_mut() {
            b.changes_issued += 1;
        }
        r
    }

    /// Reads every line the index holds on the cache device and checks it against its
    /// line crc (`lc scrub`), calling `progress` after each segment; rotten copies are
    /// dealt with as any found while serving (a dirty one's sectors are lost, reported
    /// in [`Cache::stats`]' damage; a clean one is dropped). Runs on the caller's
    /// thread, beside user I/O.
    pub fn scrub(
        &self,
        progress: &mut dyn FnMut(crate::ScrubProgress),
    ) -> Result<crate::ScrubReport> {
        crate::scrub::scrub(&self.inner, progress)
    }

    /// Writes back every dirty line of backing device `dev` (the detach step), calling
    /// `progress` as lines are written back; returns when the device has no dirty line.
    /// Fails, rather than wait forever, when writeback cannot get there: the device's
    /// writeback failing past `writeback_fail_timeout_s` (or another device's, with no
    /// progress for as long), or the log stopped before damage kept as evidence; and
    /// with [`Error::Lost`] when sectors of the device are lost to damage (until they
    /// are rewritten or the loss is accepted: the backing device holds older data).
    pub fn drain(&self, dev: u8, progress: &mut dyn FnMut(DrainProgress)) -> Result<()> {
        let inner = &self.inner;
        let mut st = inner.lock();
        if st
            .backing
            .get(dev as usize)
            .and_then(|b| b.as_ref())
            .is_none()
        {
            return Err(Error::Invalid(format!(
                "backing device {dev} is not attached"
            )));
        }
        st.drains += 1;
        let mut total = st.backing[dev as usize].as_ref().map_or(0, |b| b.dirty);
        info!(inner.log, "drain started"; "dev" => dev, "dirty_lines" => total);
        let fail_timeout = Duration::from_secs(st.tunables.writeback_fail_timeout_s as u64);
        let (mut last_remaining, mut progress_at) = (u64::MAX, Instant::now());
        let result = loop {
            let remaining = st.backing[dev as usize].as_ref().map_or(0, |b| b.dirty);
            total = total.max(remaining);
            drop(st);
            progress(DrainProgress { total, remaining });
            st = inner.lock();
            if remaining == 0 {
                // Nothing dirty is left, but lost sectors of the device would read the
                // backing device's older data once lc is gone: the loss is the
                // operator's to accept first.
                break match st
                    .damage
                    .lost
                    .range(key(dev, 0)..=key(dev, crate::index::LINE_MASK))
                    .next()
                {
                    Some((&k, _)) => Err(Error::Lost {
                        dev,
                        offset: unkey(k).1 * LINE,
                    }),
                    None => Ok(()),
                };
            }
            if let Some(f) = &st.failed {
                break Err(Error::Failed(f.clone()));
            }
            // Writeback that cannot make progress: the device failing for longer than
            // `writeback_fail_timeout_s`, or the log stopped before damage kept as
            // evidence (the refusals writes get).
            if let Some(e) = st.backing_refusal(dev).or_else(|| st.log_blocked()) {
                break Err(e);
            }
            if remaining < last_remaining {
                (last_remaining, progress_at) = (remaining, Instant::now());
            } else if let Some(e) = (progress_at.elapsed() >= fail_timeout)
                .then(|| st.any_backing_refusal())
                .flatten()
            {
                // Another device's failing writeback holds this one's back.
                break Err(e);
            }
            if st.open.as_ref().is_some_and(|o| !o.entries.is_empty()) {
                st.seal_requested = true;
            }
            inner.worker_cv.notify_all();
            st = inner.wait_io(st, Duration::from_millis(100));
        };
        st.drains -= 1;
        info!(inner.log, "drain finished"; "dev" => dev, "ok" => result.is_ok());
        result
    }

    /// Seals the open segment and waits until everything written so far is durable.
    pub fn seal_now(&self) -> Result<()> {
        let target = {
            let mut st = self.inner.lock();
            self.inner.seal(&mut st);
            st.last_written_pos()
        };
        self.inner.wait_durable(target)
    }

    /// Writes the superblock now and waits until it is on the device (written and
    /// flushed). A commit already under way does not count: it may hold older state.
    /// The writeback thread does every commit, one at a time, so two never race for
    /// the same copy.
    pub fn commit_superblock(&self) -> Result<()> {
        let mut st = self.inner.lock();
        let want = st.sb_seq + 1;
        st.commit_requested = true;
        self.inner.worker_cv.notify_all();
        while st.sb_committed < want {
            if let Some(f) = &st.failed {
                return Err(Error::Failed(f.clone()));
            }
            if let Some((seq, e)) = &st.sb_failed {
                if *seq >= want {
                    return Err(Error::Superblock(e.clone()));
                }
            }
            st = self.inner.wait_io(st, Duration::from_millis(50));
        }
        Ok(())
    }

    /// Resets the access counters.
    pub fn clear_stats(&self) {
        let mut st = self.inner.lock();
        st.counters = [0; 16];
        for b in st.backing.iter_mut().flatten() {
            b.counters = [0; 16];
        }
    }

    /// Sets a tunable by name (see [`Tunables::set`]).
    pub fn set_tunable(&self, key: &str, value: &str) -> Result<()> {
        let mut st = self.inner.lock();
        let mut t = st.tunables.clone();
        t.set(key, value)?;
        st.tunables = t;
        info!(self.inner.log, "tunable set"; "key" => key, "value" => value);
        self.inner.worker_cv.notify_all();
        Ok(())
    }

    /// The current tunables.
    pub fn tunables(&self) -> Tunables {
        self.inner.lock().tunables.clone()
    }

    /// A statistics snapshot.
    pub fn stats(&self) -> Stats {
        let st = self.inner.lock();
        let seg = self.inner.geo.segment_size as u64;
        let buffers = st.pool.len() + st.ram.len() + st.open.is_some() as usize;
        Stats {
            counters: st.counters,
            dirty_lines: per_device(&st, |b| b.dirty),
            device_counters: per_device(&st, |b| b.counters),
            last_flushed_id: st.flushed_id,
            last_writeback_id: st.wb_id,
            open_segment_id: st.open.as_ref().map_or(st.next_id, |o| o.id),
            nr_segments: self.inner.geo.nr_segments,
            dirty_segments: (st.next_id - 1 - st.wb_id)
                + st.open
                    .as_ref()
                    .map_or(0, |o| (!o.entries.is_empty()) as u64),
            cache_bytes_written: st.cache_bytes_written,
            backing_bytes_written: st.backing_bytes_written,
            promoted_lines: st.promoted_lines,
            device_promoted_lines: per_device(&st, |b| b.promoted),
            bypassed_bytes: st.bypassed_bytes,
            device_bypassed_bytes: per_device(&st, |b| b.bypassed_bytes),
            device_bypassed_writes: per_device(&st, |b| b.bypassed_writes),
            ram_bytes: buffers.max(st.ram_buffers) as u64 * seg
                + st.index.memory_bytes() as u64
                + st.line_crcs.memory_bytes() as u64,
            index_bytes: st.index.memory_bytes() as u64,
            index_entries: st.index.len() as u64,
            partial_segments: st.partial_segments,
            appends: st.appends,
            caller_appends: st.caller_appends,
            staged_lines: st.staged_lines,
            append_write_us: st.append_write_us,
            append_flush_us: st.append_flush_us,
            append_locked_us: st.append_locked_us,
            live_lines: st.index.len() as u64,
            stale_lines: st
                .index
                .segments()
                .filter(|&(seg, _)| seg > st.wb_id)
                .map(|(_, n)| (n.lines - n.live) as u64)
                .sum(),
            moved_lines: st.clean.moved_lines,
            rotten_found: st.rotten_found,
            cleaner_bytes_read: st.clean.bytes_read,
            written_back_lines: st.clean.written_back_lines,
            damage: (!st.damage.segments.is_empty()
                || st.damage.unresolved()
                || st.damage.needs_record(st.flushed_id))
            .then(|| DamageReport {
                recorded: st.damage.records && !st.damage.needs_record(st.flushed_id),
                ..st.damage.report()
            }),
            writeback_failures: st
                .backing
                .iter()
                .enumerate()
                .filter_map(|(i, b)| {
                    let f = b.as_ref()?.failing.as_ref()?;
                    Some(crate::stats::WritebackFailure {
                        dev: i as u8,
                        since: f.since_wall,
                        error: f.error.to_string(),
                    })
                })
                .collect(),
        }
    }

    /// Attaches another backing device to a running cache (a LUN added by a config
    /// reload). Its id must be free. Returns once the superblock's table records it,
    /// with the first segment that may hold its lines; if that commit fails, the
    /// device is not attached and the error is returned.
    pub fn attach_backing(&self, b: Backing) -> Result<()> {
        if b.id as usize >= MAX_BACKING {
            return Err(Error::Invalid(format!("backing device id {} > 254", b.id)));
        }
        if b.label.len() > 32 {
            return Err(Error::Invalid(format!(
                "label {:?} longer than 32 bytes",
                b.label
            )));
        }
        let mut st = self.inner.lock();
        if st.backing[b.id as usize].is_some() {
            return Err(Error::Invalid(format!(
                "backing device id {} is attached already",
                b.id
            )));
        }
        // Its lines start in a segment of their own: the open one is sealed when it
        // holds lines (maybe a detached device's of this id), and the superblock
        // records where they start before the device takes a write, so recovery never
        // replays an earlier device's copies as this one's.
        self.inner.seal(&mut st);
        let since = st.open.as_ref().map_or(st.next_id, |o| o.id);
        let dev = b.dev.clone();
        st.backing[b.id as usize] = Some(BackingSlot::new(b.dev, b.label.clone(), since));
        drop(st);
        if let Err(e) = self.commit_superblock() {
            // Not attached after all: its record is not durable. It took no write (the
            // caller serves it only once this returns).
            let mut st = self.inner.lock();
            let slot = &mut st.backing[b.id as usize];
            if slot
                .as_ref()
                .is_some_and(|s| Arc::ptr_eq(&s.dev, &dev) && s.dirty == 0)
            {
                *slot = None;
            }
            return Err(e);
        }
        info!(self.inner.log, "backing device attached"; "dev" => b.id, "label" => &b.label, "since_segment" => since);
        Ok(())
    }

    /// Detaches backing device `dev` (a LUN removed by a config reload). Refused while
    /// it has dirty lines (drain it first) or lines lost to damage. Returns once the
    /// superblock's table no longer lists it (an error if that commit failed: the
    /// device is detached in memory either way).
    pub fn detach_backing(&self, dev: u8) -> Result<()> {
        let mut st = self.inner.lock();
        let Some(b) = st.backing.get(dev as usize).and_then(|b| b.as_ref()) else {
            return Err(Error::Invalid(format!(
                "backing device {dev} is not attached"
            )));
        };
        if b.dirty > 0 {
            return Err(Error::Invalid(format!(
                "backing device {dev} ({}) has {} dirty lines; drain it first",
                b.label, b.dirty
            )));
        }
        let lost = st
            .damage
            .lost
            .keys()
            .filter(|&&k| unkey(k).0 == dev)
            .count();
        if lost > 0 {
            return Err(Error::Invalid(format!(
                "backing device {dev} has {lost} lines lost to damage; accept the loss first"
            )));
        }
        // Clean copies of the device go with it (another device may take its id).
        let clean: Vec<(u64, Loc)> = st
            .index
            .iter()
            .filter(|&(k, l)| l.clean && unkey(k).0 == dev)
            .collect();
        for (k, l) in clean {
            st.index.remove_if(k, l);
        }
        st.index.invalidate();
        st.backing[dev as usize] = None;
        drop(st);
        info!(self.inner.log, "backing device detached"; "dev" => dev);
        // Once this returns the table no longer lists it: a device given under its id
        // and label at a later open is a new one from the next segment on (`since`),
        // and the detached one's copies in the log are not taken for its lines.
        self.commit_superblock()
    }

    /// The operator's decision after damage (`lc accept-loss`): returns what was lost,
    /// then stops refusing it. Reads of those sectors return the older data again (an
    /// older cached copy or the backing device's), and writeback may pass the damaged
    /// segments, which frees their slots.
    pub fn accept_loss(&self) -> DamageReport {
        let mut st = self.inner.lock();
        let report = st.damage.report();
        if st.damage.unresolved() {
            warn!(self.inner.log, "loss accepted: older data readable again";
                  "segments" => format!("{:?}", report.segments),
                  "lost_lines" => format!("{:?}", report.lost_lines),
                  "unknown_upto" => report.unknown_upto);
        }
        // Format 2: the checkpoint thread records the acceptance (the loss records of
        // the newest checkpoint would bring the loss back at a restart).
        st.damage.accept();
        self.inner.worker_cv.notify_all();
        report
    }

    /// The text of the error that stopped the cache, if any (every call it refuses
    /// returns it typed, as [`Error::Failed`]).
    pub fn failure(&self) -> Option<String> {
        self.inner.lock().failed.as_ref().map(|f| f.to_string())
    }

    /// Flushes everything, writes the superblock and stops the worker threads.
    pub fn close(mut self) -> Result<()> {
        self.shutdown()
    }

    /// Stops the worker threads as a killed process would: nothing more is written
    /// (no seal, flush, checkpoint or superblock commit). For tests and benchmarks.
    #[doc(hidden)]
    pub fn kill(mut self) {
        {
            let mut st = self.inner.lock();
            st.failed.get_or_insert(Failure::Killed);
            st.stop_flush = true;
            st.stop_checkpoint = true;
            st.stop_writeback = true;
            self.inner.worker_cv.notify_all();
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        self.stop_side();
        self.closed = true;
    }

    /// Stops `lc-append-io`, once no append can post to it (the flusher has exited,
    /// and callers append only while it runs).
    fn stop_side(&mut self) {
        self.inner.side.stop();
        if let Some(t) = self.side.take() {
            let _ = t.join();
        }
    }

    /// Writes a checkpoint now (format 2; see `docs/FORMAT.md`, "Checkpoint"); false
    /// when none was written (format 1, nothing logged since the last one, or damage
    /// found by recovery still unresolved).
    pub fn checkpoint(&self) -> Result<bool> {
        crate::checkpoint::write(&self.inner)
    }

    fn shutdown(&mut self) -> Result<()> {
        if self.closed {
            return Ok(());
        }
        self.closed = true;
        {
            let mut st = self.inner.lock();
            st.stop_flush = true;
            self.inner.worker_cv.notify_all();
        }
        // threads[0] is the flusher: it seals and writes everything before writeback
        // stops; threads[2] writes periodic checkpoints.
        if !self.threads.is_empty() {
            let _ = self.threads.remove(0).join();
        }
        {
            let mut st = self.inner.lock();
            st.stop_checkpoint = true;
            self.inner.worker_cv.notify_all();
        }
        if self.threads.len() == 2 {
            let _ = self.threads.pop().expect("checkpoint thread").join();
        }
        // The final checkpoint: the next open replays nothing (and a loss not yet
        // recorded is, even with periodic checkpoints off).
        let final_cp = {
            let st = self.inner.lock();
            st.failed.is_none()
                && (st.tunables.checkpoint_interval_segments > 0
                    || st.damage.needs_record(st.flushed_id))
        };
        if final_cp {
            if let Err(e) = crate::checkpoint::write(&self.inner) {
                warn!(self.inner.log, "final checkpoint failed"; "error" => %e);
            }
        }
        // The writeback thread's last act is a superblock commit: it must succeed.
        let last_commit = {
            let mut st = self.inner.lock();
            st.stop_writeback = true;
            self.inner.worker_cv.notify_all();
            st.sb_seq + 1
        };
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        self.stop_side();
        let st = self.inner.lock();
        // Every line logged before the flusher exited was written by it, and nothing may
        // log one after (writers are gone; the cleaner and read promotion check
        // `stop_flush` under the lock they log under).
        let left = st.open.as_ref().map_or(0, |o| o.entries.len()) + st.ram.len();
        let unwritten = (st.failed.is_none() && left > 0)
            .then(|| st.stuck_refusal())
            .flatten();
        if let Some(e) = &unwritten {
            warn!(self.inner.log, "segments waiting for a slot writeback could not free were not written (never acknowledged durable)";
                  "open_lines_and_sealed_segments" => left, "error" => %e);
        } else if st.failed.is_none() && left > 0 {
            warn!(self.inner.log, "lines logged after the flusher stopped were not written";
                  "open_lines_and_sealed_segments" => left);
            debug_assert_eq!(left, 0, "lines logged after the flusher stopped");
        }
        let commit_failed = st
            .sb_failed
            .as_ref()
            .filter(|(seq, _)| *seq >= last_commit && st.sb_committed < last_commit);
        if let Some(e) = unwritten {
            return Err(e);
        }
        match (&st.failed, commit_failed) {
            (Some(f), _) => {
                warn!(self.inner.log, "cache closed after failure"; "error" => %f);
                Err(Error::Failed(f.clone()))
            }
            (None, Some((_, e))) => {
                warn!(self.inner.log, "cache closed, its last superblock commit failed"; "error" => %e);
                Err(Error::Superblock(e.clone()))
            }
            (None, None) => {
                info!(self.inner.log, "cache closed"; "last_flushed_id" => st.flushed_id,
                      "last_writeback_id" => st.wb_id);
                Ok(())
            }
        }
    }
}

impl Cache {
    /// Test support: recounts every segment's live lines from the index and compares
    /// them with the counts the cleaner decides from; also checks that no line lives in
    /// a released segment.
    #[doc(hidden)]
    pub fn check_line_counts(&self) -> std::result::Result<(), String> {
        let st = self.inner.lock();
        let mut live: std::collections::BTreeMap<u64, u32> = Default::default();
        let mut clean: std::collections::BTreeMap<u64, u32> = Default::default();
        let mut dirty = vec![0u64; MAX_BACKING];
        for (k, l) in st.index.iter() {
            *clean.entry(l.seg).or_default() += l.clean as u32;
            if !l.clean {
                dirty[unkey(k).0 as usize] += 1;
            }
            if l.seg <= st.wb_id {
                return Err(format!(
                    "line {:?} lives in segment {} <= last_writeback_id {}",
                    unkey(k),
                    l.seg,
                    st.wb_id
                ));
            }
            *live.entry(l.seg).or_default() += 1;
        }
        for (seg, n) in st.index.segments() {
            let want = live.get(&seg).copied().unwrap_or(0);
            if n.live != want || n.lines < n.live {
                return Err(format!(
                    "segment {seg}: counted {} live of {} lines, the index holds {want}",
                    n.live, n.lines
                ));
            }
            let want = clean.get(&seg).copied().unwrap_or(0);
            if n.clean != want {
                return Err(format!(
                    "segment {seg}: counted {} clean lines, the index holds {want}",
                    n.clean
                ));
            }
        }
        for (seg, n) in &live {
            if st.index.seg_lines(*seg).live != *n {
                return Err(format!("segment {seg}: {n} live lines not counted"));
            }
        }
        // Dirty lines per device: every entry that is not a clean copy.
        for (i, b) in st.backing.iter().enumerate() {
            if let Some(b) = b {
                if b.dirty != dirty[i] {
                    return Err(format!(
                        "backing device {i}: {} dirty lines counted, the index holds {}",
                        b.dirty, dirty[i]
                    ));
                }
            }
        }
        Ok(())
    }
}

impl Drop for Cache {
    fn drop(&mut self) {
        let _ = self.shutdown();
    }
}
