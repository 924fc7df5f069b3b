//! The cleaner: frees log slots by live data. Run by the writeback thread (`lc-writeback`)
//! when the log runs short of slots.
//!
//! The log is a ring; only its tail (segments `wb_id + 1, …`) can be freed. For each tail
//! segment the cleaner either **moves** its live lines (those the index still points at)
//! to the head of the log, which costs cache-device bandwidth only, or leaves the segment
//! to **writeback** (the backing devices, maybe an HDD at a few hundred IOPS).
//!
//! Cost rule: moving a segment with `l` live dirty lines out of `L = lines_per_segment` costs
//! `l` line copies and `l / L` of a new slot, and frees one slot; writing it back costs
//! `l` random writes to a backing device and frees one slot. Stale lines cost nothing
//! either way, and so do clean copies (lines promoted on read misses, identical to the
//! backing device): they are never moved, only dropped (`l` counts live lines that are
//! not clean; a segment whose live lines are all clean costs nothing to clean). A segment is moved when `l ≤ clean_live_max · L` (tunable, default 0.8:
//! at most 4 lines moved per line of space won), else written back: a (nearly) fully
//! live segment frees (almost) nothing by moving. The effective threshold is lowered
//! for tiny rings so that the reserve below always fits a cleaning step that gains a
//! slot (see [`live_max`]).
//!
//! When: only under *pressure* (the flusher or a writer raised `need_space`, or the
//! free slots fell below [`low_watermark`], so cleaning starts before writers stall).
//! The later a tail segment is cleaned, the more of its lines later writes have made
//! stale: moving earlier moves lines for nothing. (It used to move segments as soon as
//! the log was `writeback_threshold` full: with a working set of half the cache,
//! tail segments 60 % live, three lines moved per line written.) Background writeback
//! runs on the *dirty data* ([`dirty_pct`]), not on the log's fill; forced writeback
//! and drains always write back.
//!
//! Correctness:
//! - A line is moved under the state lock only if the index still points at the old
//!   copy; the new copy keeps its dirty bits and discard flag and becomes the index's
//!   location. The backing device's `dirty` count does not change. A copy is never
//!   moved over a newer one (a newer copy means the index points elsewhere).
//! - Segments `..=upto` whose live lines were moved are released (`wb_id = upto`,
//!   committed in the superblock) only once every segment up to the head as it was
//!   after the moves is durable: that holds every moved copy and every newer copy of a
//!   line of those segments. Hence the meaning of `last_writeback_id`: no segment at or
//!   below it holds anything recovery needs (each line was written back or has a
//!   durable newer copy).
//! - A clean copy of a segment being cleaned is dropped from the index only when the
//!   segment is released, after the commit: until then it is read from the segment, and
//!   a discard of its line finds it and writes a discard record (dropped earlier, a
//!   discard of the uncached line would go to the backing device alone while recovery
//!   could still replay the clean copy from the unreleased segment: stale data).
//! - Reserve: user writes do not fill segments with `id > wb_id + nr_segments − R`
//!   ([`reserve`]); they wait (raising `need_space`) and only the cleaner writes there,
//!   so its moves always have slots that may be written.
//! - Damage: the cleaner stops before the first damaged segment while anything is lost
//!   (`Damage::writeback_limit`), and a segment with a live line that is lost (or of
//!   unknown content) is never moved: it is left to writeback. A live line that
//!   fails its crc when read back becomes such damage (`logio::found_rot`) instead of
//!   failing the cache, and the step ends without moving anything.
//! - Moving never touches the backing devices, so a failing backing device does not
//!   stop the cleaning of segments whose live lines can be moved; under pressure with
//!   a device failing, even a tail too live for the rule is moved (rotated) while the
//!   log holds a segment's worth of stale lines, since writing it back cannot succeed.

use std::collections::BTreeMap;
use std::sync::MutexGuard;
use std::time::Duration;

use slog::warn;

use crate::device::AlignedBuf;
use crate::error::Error;
use crate::format::{Entry, Geometry, SegmentHeader, ENTRY_TOMBSTONE, FULL_LINE, LINE};
use crate::index::Loc;
use crate::logio::{
    check_lines, commit, copies_at, found_rot, read_for_moves, read_lines, rotten_copies, unlisted,
    READ_GAP,
};
use crate::state::{Inner, Pos, State};
use crate::tunables::Tunables;

/// Segments a cleaning step reads and moves at most (bounds the RAM it holds).
const MAX_STEP: u64 = 16;

/// Lines moved per hold of the engine lock (128 KiB of copying): writers, readers and
/// the event loop get the lock between runs, as they do between a write's runs.
const MOVES_PER_HOLD: u32 = 32;

/// Slots only the cleaner may fill (0 when moving is off).
///
/// A cleaning step that started with `R` free slots and moves tail segments that are at
/// most a fraction `f` live frees at least `⌊R / f⌋` segments while filling at most `R`;
/// it gains a slot when `R / f ≥ R + 1`, i.e. `R ≥ f / (1 − f)`: 4 for the default 0.8.
/// `R` is at most a quarter of the ring (at least 1); [`live_max`] lowers `f` to
/// `R / (R + 1)` when the ring is too small for the configured threshold.
pub(crate) fn reserve(geo: &Geometry, t: &Tunables) -> u64 {
    let f = t.clean_live_max.min(95) as u64;
    if f == 0 {
        return 0;
    }
    let want = (f).div_ceil(100 - f);
    want.clamp(1, (geo.nr_segments / 4).max(1))
}

/// The effective live share (percent) up to which a segment is moved.
pub(crate) fn live_max(geo: &Geometry, t: &Tunables) -> u64 {
    let r = reserve(geo, t);
    if r == 0 {
        return 0;
    }
    (t.clean_live_max.min(95) as u64).min(100 * r / (r + 1))
}

/// The dirty share (percent) background writeback compares with `writeback_threshold`.
/// With moving on, the live dirty lines (and discard records) against the ring's line
/// capacity: the data that still needs the backing devices. Stale lines are not dirty
/// data; the cleaner reclaims their slots when the log runs short. With moving off
/// only writeback frees slots, so the log's fill ([`State::dirty_log_pct`]) as
/// before the cleaner.
pub(crate) fn dirty_pct(geo: &Geometry, st: &State) -> u64 {
    if live_max(geo, &st.tunables) == 0 {
        return st.dirty_log_pct(geo.nr_segments, st.tunables.writeback_threshold as u64);
    }
    let dirty: u64 = st.backing.iter().flatten().map(|b| b.dirty).sum();
    dirty * 100 / (geo.nr_segments * geo.lines_per_segment as u64)
}

/// Cleaning starts when fewer slots than this are free.
pub(crate) fn low_watermark(geo: &Geometry, t: &Tunables) -> u64 {
    reserve(geo, t) + (geo.nr_segments / 16).max(1)
}

/// Slots not yet given to a segment (negative: segments wait in RAM for a slot).
pub(crate) fn free_slots(geo: &Geometry, st: &State) -> i64 {
    (st.wb_id + geo.nr_segments) as i64 - (st.next_id as i64 - 1)
}

/// For a user write about to add a line: true when the segment it would fill (the open
/// one, or the next) lies in the cleaner's reserve, so the writer must wait; raises
/// `need_space`. Checked before a segment is opened, so users never open one there.
pub(crate) fn user_must_wait(inner: &Inner, st: &mut State) -> bool {
    if !in_reserve(inner, st) {
        return false;
    }
    if !st.need_space {
        st.need_space = true;
        inner.worker_cv.notify_all();
    }
    true
}

/// True when the segment the next line would fill lies in the cleaner's reserve (a
/// user write would wait; a promotion is skipped).
pub(crate) fn in_reserve(inner: &Inner, st: &State) -> bool {
    let r = reserve(&inner.geo, &st.tunables);
    r > 0 && next_fill(&inner.geo, st) + r > st.wb_id + inner.geo.nr_segments
}

/// Id of the segment the next line goes to (the open one while it has room).
fn next_fill(geo: &Geometry, st: &State) -> u64 {
    match &st.open {
        Some(o) if o.entries.len() < geo.lines_per_segment as usize => o.id,
        Some(o) => o.id + 1,
        None => st.next_id,
    }
}

/// Id of the newest segment holding any line (the open one only if it has lines).
fn head_id(st: &State) -> u64 {
    head(st).id
}

/// The end of the log: every line written so far.
fn head(st: &State) -> Pos {
    st.last_written_pos()
}

/// What a cleaning step did or asks the writeback thread to do.
pub(crate) enum Step<'a> {
    /// Nothing to clean: the writeback thread goes on as before, in the same hold of
    /// the lock the cleaner decided in (so a writer cannot run short in between and
    /// have its room made by a writeback batch instead of a move).
    Idle(MutexGuard<'a, State>),
    /// Progress (or a bounded wait for it); call again.
    Worked,
    /// Write back segments `first..=last` (the tail is too live to move, or cannot be).
    Writeback { first: u64, last: u64 },
}

/// Moved segments waiting for durability before their slots are released.
#[derive(Clone, Copy, Debug)]
struct Pending {
    upto: u64,
    target: Pos,
}

/// The cleaner's memory between steps (owned by the writeback thread).
#[derive(Default)]
pub(crate) struct Cleaner {
    pending: Option<Pending>,
    /// A segment found holding a live line that must not be moved (lost to damage).
    unmovable: Option<u64>,
    /// Clean copies found live in the pending segments: dropped at their release.
    clean_lines: Vec<(u64, Loc)>,
}

enum Moved {
    /// Every live line of the segment is at the head now.
    Done,
    /// No slot may be written for more moves.
    NoRoom,
    /// No RAM buffer now; retry after the flusher wrote one.
    NoBuffer,
    /// Moved [`MOVES_PER_HOLD`] lines: let the lock go, then continue.
    Yield,
    /// A live line is lost to damage: the segment is left to writeback.
    Unmovable,
}

impl Cleaner {
    /// One cleaning step. Takes the state lock held by the caller and releases it.
    pub(crate) fn step<'a>(&mut self, inner: &'a Inner, mut st: MutexGuard<'a, State>) -> Step<'a> {
        let geo = &inner.geo;
        let lps = geo.lines_per_segment as u64;
        if st.failed.is_some() {
            self.pending = None;
            self.clean_lines.clear();
            return Step::Idle(st);
        }
        // Segments beyond the ring (users filled it before the reserve applied, e.g.
        // moving was just turned on): moves could not be written before writeback
        // frees slots, so writeback goes first.
        let beyond = head_id(&st) > st.wb_id + geo.nr_segments;
        if beyond
            && self
                .pending
                .is_some_and(|p| p.target.id > st.wb_id + geo.nr_segments)
        {
            // Leave the moved copies as duplicates; the old segments stay as they are.
            self.pending = None;
            self.clean_lines.clear();
        }
        // 1. Release moved segments once the head after their moves is durable.
        if let Some(p) = self.pending {
            if st.durable_pos() >= p.target {
                drop(st);
                self.pending = None;
                let clean = std::mem::take(&mut self.clean_lines);
                if let Err(e) = release(inner, p.upto, &clean) {
                    cache_failed(inner, e);
                }
                return Step::Worked;
            }
        }
        let f = live_max(geo, &st.tunables);
        let moving = f > 0 && st.drains == 0 && !st.stop_flush && !st.stop_writeback;
        let free = free_slots(geo, &st);
        // Only under pressure: moving early only moves lines that later writes would
        // have made stale, and frees nothing writers need yet (background writeback,
        // above `writeback_threshold`, is the writeback thread's, see [`dirty_pct`]).
        let pressure = st.need_space || free < low_watermark(geo, &st.tunables) as i64;
        let wanted = moving && pressure;
        // A failing backing device: writeback of a tail holding its lines cannot
        // succeed, so under pressure the tail is moved whatever its live share, as
        // long as the log holds a segment's worth of stale lines for the rotation to
        // win.
        let rotation = moving
            && st.backing.iter().flatten().any(|b| b.failing.is_some())
            && st
                .index
                .segments()
                .filter(|&(id, _)| id > st.wb_id)
                .map(|(_, n)| (n.lines - n.live) as u64)
                .sum::<u64>()
                >= lps;
        let rotate = pressure && rotation;
        // The rule: live lines against the slot a move frees.
        let passes =
            |st: &State, id: u64| st.index.seg_lines(id).dirty_live() as u64 * 100 <= f * lps;
        // For a writer waiting for space (`State::stuck_refusal`): space comes without
        // the backing devices while moved segments wait for release or the tail
        // passes the rule under pressure (flushed or not yet).
        let tail = st.wb_id + 1;
        st.clean.tail_movable = self.pending.is_some()
            || (moving
                && !beyond
                && tail < st.next_id
                && tail <= st.damage.writeback_limit(st.flushed_id)
                && self.unmovable != Some(tail)
                && (rotation || passes(&st, tail)));
        let movable = |st: &State, id: u64| rotate || passes(st, id);
        if !wanted && self.pending.is_none() {
            return Step::Idle(st);
        }
        // 2. Plan: the tail segments after what was moved already, while each is live at
        // most `f` and their live lines fit the slots that may be written.
        let first = st.wb_id.max(self.pending.map_or(0, |p| p.upto)) + 1;
        let end = st
            .flushed_id
            .min(st.damage.writeback_limit(st.flushed_id))
            .min(st.wb_id + geo.nr_segments);
        let open_room = st
            .open
            .as_ref()
            .filter(|o| o.id <= st.wb_id + geo.nr_segments)
            .map_or(0, |o| lps - o.entries.len() as u64);
        let new_room = (st.wb_id + geo.nr_segments + 1).saturating_sub(st.next_id) * lps;
        let mut room = open_room + new_room;
        let mut last = first - 1;
        if wanted && !beyond && self.unmovable != Some(first) {
            while last < end && last + 1 - first < MAX_STEP {
                let live = st.index.seg_lines(last + 1).dirty_live() as u64;
                if !movable(&st, last + 1) || live > room {
                    break;
                }
                room -= live;
                last += 1;
            }
        }
        if last < first {
            if let Some(p) = self.pending {
                // Nothing more to move: make the head durable so the moved segments
                // can be released.
                inner.request_durable(&mut st, p.target);
                let _ = inner.io_cv.wait_timeout(st, Duration::from_millis(50));
                return Step::Worked;
            }
            if wanted && first <= end {
                // The tail is too live to move (or holds a lost line): write it back,
                // with the segments after it that are too live as well.
                let max = end.min(first + st.tunables.writeback_batch as u64 - 1);
                let mut last = first;
                while last < max && !movable(&st, last + 1) {
                    last += 1;
                }
                return Step::Writeback { first, last };
            }
            return Step::Idle(st);
        }
        // 3. Read the planned segments and move. Damaged segments and segments with no
        // live line (live counts only fall) have nothing to move and are not read,
        // except a damaged segment recovery took at an older append: the index holds
        // that append's lines (read with its header, as writeback does).
        let skip: Vec<u64> = (first..=last)
            .filter(|&id| st.index.seg_lines(id).live == 0)
            .collect();
        let gens = st
            .recovered_gens
            .range(first..=last)
            .map(|(&k, &v)| (k, v))
            .collect();
        // Whole, unless its live lines are so few that they lie further apart than
        // READ_GAP on average: then the header first, and the live lines alone.
        let plan: Vec<(u64, bool)> = (first..=last)
            .filter(|id| !skip.contains(id))
            .map(|id| {
                let live = st.index.seg_lines(id).dirty_live() as u64;
                (id, live * READ_GAP as u64 >= lps)
            })
            .collect();
        drop(st);
        let (bufs, headers) = match read_live(inner, &plan, &gens) {
            Ok(r) => r,
            // Recorded as damage: the next step plans up to it.
            Err(Error::Rotten { .. }) => return Step::Worked,
            Err(e) => {
                cache_failed(inner, e);
                return Step::Worked;
            }
        };
        let mut st = inner.lock();
        // The cache began closing while the segments were read: the flusher may have
        // written its last segment and exited, and a line moved now would never be
        // written (nor the final checkpoint, which waits for it to be durable).
        if st.stop_flush {
            return Step::Idle(st);
        }
        let mut done = first - 1;
        let mut segs = headers.iter().zip(bufs.iter()).peekable();
        for id in first..=last {
            if skip.contains(&id) {
                done = id;
                continue;
            }
            let (h, buf) = segs.next().expect("a header per segment read");
            debug_assert_eq!(h.id, id);
            let mut next = 0;
            let r = loop {
                match move_segment(inner, &mut st, h, buf, &mut self.clean_lines, &mut next) {
                    Moved::Yield => {
                        drop(st);
                        st = inner.lock();
                        if st.failed.is_some() || st.stop_flush {
                            break Moved::NoRoom;
                        }
                    }
                    Moved::NoBuffer => {
                        inner.worker_cv.notify_all();
                        st = inner.wait_io(st, Duration::from_millis(10));
                        if st.failed.is_some() || st.stop_flush {
                            break Moved::NoRoom;
                        }
                    }
                    r => break r,
                }
            };
            match r {
                Moved::Done => done = id,
                Moved::Unmovable => {
                    self.unmovable = Some(id);
                    break;
                }
                Moved::NoRoom | Moved::NoBuffer | Moved::Yield => break,
            }
        }
        if done >= first {
            let target = head(&st).max(self.pending.map_or(Pos::default(), |p| p.target));
            self.pending = Some(Pending { upto: done, target });
        } else if self.pending.is_none() {
            // Nothing fit after all (the room went to writers): wait a little.
            let _ = inner.io_cv.wait_timeout(st, Duration::from_millis(10));
        }
        Step::Worked
    }
}

/// Reads what the cleaner needs of the segments `plan` lists (id, and whether to read
/// it whole) and checks the live dirty lines of each against their crcs
/// ([`check_lines`]), not the whole segment (nor discard records: their bytes carry
/// nothing, and a move writes zeros for them). A segment not read whole is read as its
/// header, then (after the engine lock was taken once for all of them, to list the
/// live lines) its live lines alone ([`read_lines`]), so that cleaning a mostly stale
/// segment reads little more than its live data. Live lines only ever become stale (a
/// newer copy always lands at the head), so every line [`move_segment`] finds live
/// later was read and checked here.
fn read_live(
    inner: &Inner,
    plan: &[(u64, bool)],
    gens: &BTreeMap<u64, u16>,
) -> Result<(Vec<AlignedBuf>, Vec<SegmentHeader>), Error> {
    let mut bufs = Vec::new();
    let mut headers = Vec::new();
    let mut bytes = 0;
    for &(id, whole) in plan {
        let (buf, h, n) = read_for_moves(inner, id, whole, gens).inspect_err(|e| {
            if matches!(e, Error::Rotten { .. }) {
                found_rot(inner, e, id, None);
            }
        })?;
        bufs.push(buf);
        headers.push(h);
        bytes += n;
    }
    type Copies = Vec<(u64, u16)>;
    let (live, missing): (Vec<Vec<usize>>, Vec<Copies>) = {
        let st = inner.lock();
        headers
            .iter()
            .map(|h| {
                let live = (0..h.entries.len())
                    .filter(|&slot| live_at(&st, h, slot).is_some_and(|(_, l)| !l.clean && !l.tomb))
                    .collect();
                (live, unlisted(&st, h))
            })
            .unzip()
    };
    // Live copies its header does not list (an older append's header was read).
    if let Some((h, m)) = headers.iter().zip(&missing).find(|(_, m)| !m.is_empty()) {
        return Err(rotten_copies(inner, h.id, m));
    }
    for (((buf, h), slots), &(_, whole)) in bufs.iter_mut().zip(&headers).zip(&live).zip(plan) {
        let checked = if whole {
            check_lines(inner, buf, h, slots)
        } else {
            read_lines(inner, buf, h, slots).map(|n| bytes += n)
        };
        match checked {
            Err(Error::Rotten {
                slots: Some(bad), ..
            }) => {
                return Err(rotten_copies(inner, h.id, &copies_at(h, &bad)));
            }
            Err(e) => return Err(e),
            Ok(()) => {}
        }
    }
    inner.lock().clean.bytes_read += bytes;
    Ok((bufs, headers))
}

/// The index key of the line in slot `slot` of segment `h`, and its location in the
/// index if that is this copy (the line is live here).
pub(crate) fn live_at(st: &State, h: &SegmentHeader, slot: usize) -> Option<(u64, Loc)> {
    let k = h.entries[slot].line_key();
    st.index
        .get(k)
        .filter(|l| l.seg == h.id && l.slot as usize == slot)
        .map(|l| (k, l))
}

/// Moves the live lines of segment `h` (its bytes in `buf`) to the open segment, at
/// most [`MOVES_PER_HOLD`] of them per call (`Yield` when more are left). `next` is
/// the slot to continue from: a call after `Yield` or `NoBuffer` continues where the
/// last stopped (the slots before it were moved, stale or listed clean, and an index
/// entry never points back at an old copy); each line is checked against the index
/// under the lock it is moved under.
/// Clean copies are not moved: they are listed in `clean` (dropped at release).
fn move_segment(
    inner: &Inner,
    st: &mut State,
    h: &SegmentHeader,
    buf: &[u8],
    clean: &mut Vec<(u64, Loc)>,
    next: &mut usize,
) -> Moved {
    let geo = &inner.geo;
    let ds = geo.data_start();
    // A live line lost to damage must never get a newer copy (it would read again).
    if st.damage.unresolved() {
        for slot in 0..h.entries.len() {
            if let Some((k, l)) = live_at(st, h, slot) {
                let bits = if l.tomb { FULL_LINE } else { l.dirty };
                if !st.damage.readable(k, bits, Some(l)) {
                    return Moved::Unmovable;
                }
            }
        }
    }
    let mut moved = 0;
    for (slot, e) in h.entries.iter().enumerate().skip(*next) {
        let Some((k, l)) = live_at(st, h, slot) else {
            continue; // stale: a newer copy exists (or the line was written back)
        };
        if l.clean {
            clean.push((k, l));
            continue;
        }
        if moved == MOVES_PER_HOLD {
            *next = slot;
            return Moved::Yield;
        }
        // An open segment with a free line, in a slot that may be written.
        if next_fill(geo, st) > st.wb_id + geo.nr_segments {
            *next = slot;
            return Moved::NoRoom;
        }
        if !inner.ensure_open(st) {
            *next = slot;
            return Moved::NoBuffer;
        }
        let o = st.open.as_mut().expect("open");
        let new_slot = o.entries.len();
        let src = ds + slot * LINE as usize;
        let dst = ds + new_slot * LINE as usize;
        if l.tomb {
            // A discard record's bytes are zeros (they are not read: see `read_live`).
            o.buf[dst..dst + LINE as usize].fill(0);
        } else {
            o.buf[dst..dst + LINE as usize].copy_from_slice(&buf[src..src + LINE as usize]);
        }
        o.entries.push(Entry {
            sector: e.sector,
            dev: e.dev,
            dirty: l.dirty,
            flags: if l.tomb { ENTRY_TOMBSTONE } else { 0 },
            crc: None,
        });
        let loc = Loc {
            seg: o.id,
            slot: new_slot as u16,
            dirty: l.dirty,
            tomb: l.tomb,
            clean: false,
        };
        let old = st.index.insert(k, loc);
        debug_assert_eq!(old, Some(l));
        st.clean.moved_lines += 1;
        moved += 1;
    }
    Moved::Done
}

/// The cache device failed while cleaning: the cache stops accepting writes.
fn cache_failed(inner: &Inner, e: Error) {
    warn!(inner.log, "cache device failed during cleaning; cache stops"; "error" => %e);
    inner.fail(&mut inner.lock(), e);
}

/// Persists `wb_id = upto` (every segment up to it is empty of needed data now) and
/// frees the slots, dropping the clean copies `clean` still live in them. Not past
/// damage that holds the evidence: a loss found after the lines were read (by a read,
/// the scrub) took its copy out of the index, so the move left it behind and the
/// segment looked done; the moved segments from the damaged one on stay (their moved
/// lines are duplicates now) until the loss is recorded.
fn release(inner: &Inner, upto: u64, clean: &[(u64, Loc)]) -> Result<(), Error> {
    let upto = {
        let st = inner.lock();
        let upto = upto.min(st.damage.writeback_limit(st.flushed_id));
        if upto <= st.wb_id {
            return Ok(());
        }
        upto
    };
    commit(inner, Some(upto))?;
    let mut st = inner.lock();
    if upto > st.wb_id {
        st.wb_id = upto;
    }
    for &(k, l) in clean.iter().filter(|(_, l)| l.seg <= upto) {
        st.index.remove_if(k, l);
    }
    st.damage.passed(upto);
    st.unreadable = st.unreadable.split_off(&(upto + 1));
    st.recovered_gens = st.recovered_gens.split_off(&(upto + 1));
    st.index.forget_segments(upto);
    st.need_space = false;
    inner.io_cv.notify_all();
    inner.worker_cv.notify_all();
    Ok(())
}
