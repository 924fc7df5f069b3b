//! The flusher thread (`lc-flush`): when a flush waits past `barrier_deadline_ms` (or
//! no other writer could add lines), makes the open segment's lines durable: format 2
//! *appends* them (the new lines and a new header copy go to the segment's slot, the
//! device is flushed, and the segment stays open for the lines that follow), format 1
//! seals the segment. Seals the open segment when it has been idle for
//! `flush_interval_s`, or on request;
//! writes sealed segments to their ring slots in id order, encoding each one's final
//! header first (data crc and the `prev_crc` chain: the seal left it pending), whole
//! segments in consecutive slots as one vectored write, and returns their buffers to
//! the pool (`written_id`); flushes the cache device
//! when someone waits for durability (a flush or FUA write), when writeback needs the
//! segments, or when written data has gone unflushed for a second or 16 segments, then
//! advances `flushed_id` and wakes the waiters.
//!
//! A segment is written only when its slot is free (`id <= wb_id + nr_segments`); if
//! not, the flusher raises `need_space` so the writeback thread runs, and waits.

use std::sync::{Arc, MutexGuard};
use std::time::{Duration, Instant};

use slog::{error, info};

use crate::device::AlignedBuf;
use crate::error::Error;
use crate::format::{Geometry, SegmentHeader, LINE};
use crate::state::{Inner, OpenSeg, Pos, Sealed, State, STAGE_WINDOW};

/// Body of the flusher thread.
pub(crate) fn run(inner: &Inner) {
    let mut st = inner.lock();
    loop {
        if st.caller_io {
            // A caller is appending the open segment (`append_here`): the log is its
            // until it is done, and it wakes us then.
            st = inner
                .worker_cv
                .wait_timeout(st, Duration::from_millis(100))
                .unwrap_or_else(|e| e.into_inner())
                .0;
            continue;
        }
        let now = Instant::now();
        let open_lines = st.open.as_ref().map_or(0, |o| o.entries.len());
        let mut append_due = false;
        if open_lines > 0 {
            let open = st.open.as_ref().expect("open");
            let deadline_due = st.flush_req.is_some_and(|(t, target)| {
                // Wait for more lines only while some writer could still add them.
                target.id >= open.id
                    && (st.active_writers == 0
                        || now >= t + Duration::from_millis(st.tunables.barrier_deadline_ms as u64))
            });
            let idle = st.tunables.flush_interval_s > 0
                && now
                    >= open.last_write + Duration::from_secs(st.tunables.flush_interval_s as u64);
            let full = open_lines >= inner.geo.lines_per_segment as usize;
            // A seal someone asked for (writeback waiting for a line to be immutable,
            // or for its segment to be written whole) is not lost to an append that
            // waits for a slot (that may be the slot the asker frees), nor to a flush
            // request with nothing left to append.
            let beyond = open.id > st.wb_id + inner.geo.nr_segments;
            let nothing_new = open.written >= open_lines;
            if deadline_due
                && inner.geo.appends()
                && !full
                && !st.stop_flush
                && !(st.seal_requested && (beyond || nothing_new))
            {
                append_due = open.written < open_lines;
            } else if deadline_due || idle || full || st.seal_requested || st.stop_flush {
                inner.seal(&mut st);
            }
        }
        st.seal_requested = false;
        if st.flush_req.is_some_and(|(_, target)| {
            st.durable_pos() >= target || st.open.as_ref().is_none_or(|o| o.id > target.id)
        }) {
            // Everything the request waits for is durable or sealed; the writes below
            // satisfy it.
            st.flush_req = None;
        }
        let limit = st.wb_id + inner.geo.nr_segments;
        let append_id = st.open.as_ref().map_or(0, |o| o.id);
        let behind = st.ram.range(st.write_started_id + 1..).next().is_some();
        // An append about to run flushes the device after its writes, and that flush
        // covers every segment written before it: no flush of its own before it.
        let append_next = append_due && !behind && append_id <= limit;
        // 1. A flush someone waits for, once what they wait for is written.
        let wanted = st.durable_req.id > st.flushed_id
            && st.written_id
                >= st
                    .durable_req
                    .id
                    .min(st.open.as_ref().map_or(st.next_id, |o| o.id) - 1);
        if st.written_id > st.flushed_id
            && st.failed.is_none()
            && !append_next
            && (wanted || flush_due(&st, now))
        {
            st = flush_device(inner, st);
            continue;
        }
        // 3. Then an append of the open segment, once everything before it is written.
        if append_due && !behind && st.failed.is_none() {
            if append_id <= limit {
                st = append(inner, st);
                continue;
            }
            if !st.need_space {
                st.need_space = true;
                inner.worker_cv.notify_all();
            }
        }
        // 4. Lines of the open segment staged ahead of the flush that will want them.
        if !append_due
            && !behind
            && st.failed.is_none()
            && append_id <= limit
            && stage_due(inner, &st, now)
        {
            st = stage(inner, st);
            continue;
        }
        // 2. The next run of sealed segments whose slots are free (3 and 4 above run
        // only when none waits to be written: `behind`).
        let batch: Vec<Arc<Sealed>> = st
            .ram
            .range(st.write_started_id + 1..)
            .take_while(|(id, _)| **id <= limit)
            .map(|(_, s)| s.clone())
            .collect();
        let blocked = behind && batch.is_empty();
        if blocked && !st.need_space {
            st.need_space = true;
            inner.worker_cv.notify_all();
        }
        if batch.is_empty() || st.failed.is_some() {
            let nothing_left = st.ram.is_empty()
                && st.open.as_ref().is_none_or(|o| o.entries.is_empty())
                && st.written_id == st.flushed_id;
            // Segments that wait for a slot writeback cannot free (damage kept for
            // good, a backing device failing past its timeout: writes and flushes get
            // that error) are never written: nothing acknowledged durable is in them,
            // and `close` reports them.
            let stuck = blocked && st.stuck_refusal().is_some();
            if st.stop_flush && (nothing_left || st.failed.is_some() || stuck) {
                break;
            }
            // Sleep until work arrives or the next timer fires.
            let mut wait = Duration::from_secs(1);
            if let Some((t, _)) = st.flush_req {
                // A deadline already past waits for other progress (a free slot).
                let due = t + Duration::from_millis(st.tunables.barrier_deadline_ms as u64);
                if due > now {
                    wait = wait.min(due - now);
                }
            }
            if st.tunables.flush_interval_s > 0 {
                if let Some(o) = st.open.as_ref().filter(|o| !o.entries.is_empty()) {
                    let due =
                        o.last_write + Duration::from_secs(st.tunables.flush_interval_s as u64);
                    wait = wait.min(due.saturating_duration_since(now));
                }
            }
            if let Some(t) = st.unflushed_since {
                wait = wait.min((t + UNFLUSHED_MAX_AGE).saturating_duration_since(now));
            }
            st.flusher_idle = true;
            st = inner
                .worker_cv
                .wait_timeout(st, wait.max(Duration::from_micros(100)))
                .unwrap_or_else(|e| e.into_inner())
                .0;
            st.flusher_idle = false;
            continue;
        }
        let last = batch.last().expect("batch").id;
        st.write_started_id = last;
        st.slot_claimed_id = st.slot_claimed_id.max(last);
        let mut prev_crc = st.prev_crc;
        drop(st);
        let mut bytes = 0u64;
        let mut result = Ok(());
        let mut crcs = Vec::with_capacity(batch.len());
        let mut line_crcs = Vec::with_capacity(batch.len());
        for chunk in batch.chunks(WRITE_CHUNK_SEGMENTS) {
            let headers: Vec<Option<AlignedBuf>> = chunk
                .iter()
                .map(|seg| {
                    let h = final_header(inner, seg, &mut prev_crc, &mut line_crcs);
                    crcs.push((seg.id, prev_crc));
                    h
                })
                .collect();
            let parts: Vec<(&[u8], u64)> = chunk
                .iter()
                .zip(&headers)
                .flat_map(|(seg, h)| sealed_parts(&inner.geo, seg, h.as_ref()))
                .collect();
            match write_runs(inner, &parts) {
                Ok(b) => bytes += b,
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
        }
        st = inner.lock();
        st.cache_bytes_written += bytes;
        match result {
            Ok(()) => {
                st.prev_crc = prev_crc;
                st.chain.extend(crcs.iter().copied());
                if let Some(&(_, c)) = crcs.iter().find(|(id, _)| Some(*id) == st.cp_crc_want) {
                    st.cp_crc_got = Some(c);
                }
                st.written_id = last;
                st.unflushed_since.get_or_insert(Instant::now());
                // Before the segments leave RAM: reads of their lines from the device
                // check them against these (appends recorded the lines before).
                for (id, first, c) in line_crcs {
                    st.line_crcs.record(id, first, c.into_iter());
                }
                // The segments are readable from the cache device now. Readers copy
                // under the lock and keep no clone, so once the batch's clones are gone
                // each buffer comes back to the pool.
                drop(batch);
                let done: Vec<u64> = st.ram.range(..=last).map(|(id, _)| *id).collect();
                for id in done {
                    if let Some(seg) = st.ram.remove(&id) {
                        let buf = match Arc::try_unwrap(seg) {
                            Ok(s) => s.buf,
                            Err(_) => AlignedBuf::new(inner.geo.segment_size as usize),
                        };
                        st.pool.push(buf);
                    }
                }
            }
            Err(e) => fail(inner, &mut st, e),
        }
        inner.io_cv.notify_all();
        inner.worker_cv.notify_all();
    }
    info!(inner.log, "flusher stopped"; "last_flushed_id" => st.flushed_id);
    // Nothing more becomes durable: waiters (a checkpoint, the cleaner) give up.
    st.flusher_exited = true;
    inner.io_cv.notify_all();
    drop(st);
}

/// Sealed segments whose final headers are encoded before their writes start: the
/// writes of one chunk go out together.
const WRITE_CHUNK_SEGMENTS: usize = 8;

/// The most bytes one write of adjacent pieces takes.
const MAX_RUN: usize = 8 << 20;

/// Encodes the final header of a sealed segment (when it needs one) after the header
/// of crc `prev_crc`, and leaves this segment's header crc there; adds the line crcs
/// it computed to `lines` (segment id, first line, crcs).
fn final_header(
    inner: &Inner,
    seg: &Sealed,
    prev_crc: &mut u32,
    lines: &mut Vec<(u64, usize, Vec<Option<u32>>)>,
) -> Option<AlignedBuf> {
    match &seg.header {
        Some(h) => {
            let (b, crc, crcs) = h.encode(inner, seg, *prev_crc);
            *prev_crc = crc;
            lines.push((seg.id, h.written, crcs));
            Some(b)
        }
        None => {
            *prev_crc = seg.hcrc;
            None
        }
    }
}

/// What is left to write of a sealed segment, with the device offset of each piece:
/// all of it (header copy 0, the zeros of copy 1 and the lines) when no append or
/// staging wrote any, else the lines not yet on the device and the final header's copy
/// (unless the newest append's is final, `header` `None`).
fn sealed_parts<'a>(
    geo: &Geometry,
    seg: &'a Sealed,
    header: Option<&'a AlignedBuf>,
) -> Vec<(&'a [u8], u64)> {
    let (hl, ds, line) = (geo.header_len(), geo.data_start(), LINE as usize);
    let base = geo.segment_offset(seg.id);
    let c = geo.header_copy(seg.gen);
    let mut parts: Vec<(&[u8], u64)> = Vec::new();
    if seg.from == 0 {
        // Nothing of the slot written yet: the header is copy 0, the rest follows it.
        debug_assert_eq!(c, 0);
        if let Some(h) = header {
            parts.push((h, base));
        }
        parts.push((&seg.buf[hl..ds + seg.n * line], base + hl as u64));
    } else {
        if seg.n > seg.from {
            let lines = &seg.buf[ds + seg.from * line..ds + seg.n * line];
            parts.push((lines, geo.line_offset(seg.id, seg.from as u32)));
        }
        if let Some(h) = header {
            parts.push((h, base + (c * hl) as u64));
        }
    }
    parts
}

/// Writes `parts` in their order, each run of adjacent pieces (a whole segment, and
/// whole segments in consecutive slots) as one write of up to [`MAX_RUN`] bytes.
/// Returns the bytes written.
fn write_runs(inner: &Inner, parts: &[(&[u8], u64)]) -> Result<u64, Error> {
    let mut bytes = 0u64;
    let mut i = 0;
    while i < parts.len() {
        let start = parts[i].1;
        let mut run = vec![parts[i].0];
        let mut end = start + parts[i].0.len() as u64;
        i += 1;
        while i < parts.len()
            && parts[i].1 == end
            && (end - start) as usize + parts[i].0.len() <= MAX_RUN
        {
            run.push(parts[i].0);
            end += parts[i].0.len() as u64;
            i += 1;
        }
        inner
            .cache
            .write_vectored_at(&run, start)
            .map_err(|e| Error::io(&inner.cache.describe(), start, e))?;
        bytes += end - start;
    }
    Ok(bytes)
}

/// Format 2: a caller waiting for durability (`Inner::wait_durable`: a flush, a FUA
/// write, a checkpoint) appends the open segment's lines itself, on its own thread,
/// when that is all the target needs and the flusher is idle, instead of waking the
/// flusher and waiting to be woken: two thread hand-offs less per flush. The append is
/// the flusher's own ([`append`]); while it runs, `caller_io` keeps the flusher from
/// touching the log, so appends, staging and segment writes stay one at a time and in
/// order as when the flusher does them all. Not when another writer is inside
/// `write` (the barrier deadline lets its lines join the flusher's append), when
/// sealed segments wait to be written before the open one, or when the open segment's
/// slot may not be written yet. Returns whether it appended.
pub(crate) fn append_here<'a>(
    inner: &'a Inner,
    mut st: MutexGuard<'a, State>,
    target: Pos,
) -> (MutexGuard<'a, State>, bool) {
    let geo = &inner.geo;
    let lps = geo.lines_per_segment as usize;
    let limit = st.wb_id + geo.nr_segments;
    let due = geo.appends()
        && st.flusher_idle
        && !st.caller_io
        && st.failed.is_none()
        && !st.stop_flush
        && st.active_writers == 0
        && st.ram.range(st.write_started_id + 1..).next().is_none()
        && st.open.as_ref().is_some_and(|o| {
            o.id == target.id
                && o.written < o.entries.len()
                && o.entries.len() < lps
                && o.id <= limit
        });
    if !due {
        return (st, false);
    }
    st.caller_io = true;
    st.caller_appends += 1;
    st = append(inner, st);
    st.caller_io = false;
    inner.worker_cv.notify_all();
    (st, true)
}

/// Format 2: makes the open segment's lines durable without sealing it. Writes the
/// lines not yet on the device (those after `staged`) and a header of the next
/// generation into the copy the previous generation does not occupy (the first append
/// of a segment nothing was staged for writes copy 0 and zeros copy 1 with its lines,
/// in one write; staging wrote those zeros otherwise), then flushes the cache device.
/// Called only when every segment before the open one is written, so after the flush
/// the whole log up to here is durable.
///
/// Under the lock only the new lines are copied out and the entries cloned (writers go
/// on filling the segment meanwhile); lines `0..n` are immutable from here (a rewrite
/// takes a new line, `staged`). Then the lines' write goes to `lc-append-io` while
/// this thread computes their crcs, encodes the header and writes it: the order of
/// the two writes does not matter, as neither counts before the flush (a header whose
/// lines did not all arrive fails its data crc, and recovery takes the copy before
/// it). The segment's `written`, `crc` and `hcrc` change only once the append is
/// durable; a seal in between (a writer filling the segment, a checkpoint) leaves
/// the final header to cover lines from the old `written` on, and the flusher writes
/// that segment only after this append returns (it is this append's thread, or waits
/// for `caller_io`).
fn append<'a>(inner: &'a Inner, mut st: MutexGuard<'a, State>) -> MutexGuard<'a, State> {
    let locked = Instant::now();
    let geo = &inner.geo;
    let (hl, ds, line) = (geo.header_len(), geo.data_start(), LINE as usize);
    let (prev_crc, durable) = (st.prev_crc, st.durable_claim());
    let spare = st.append_buf.take();
    let o = st.open.as_mut().expect("open segment");
    let (id, written, staged, n, gen) = (o.id, o.written, o.staged, o.entries.len(), o.gen + 1);
    let old_crc = o.crc;
    let entries = o.entries.clone();
    // Lines staged since the last append are on the device; their crcs need their bytes.
    let staged_bytes =
        (staged > written).then(|| o.buf[ds + written * line..ds + staged * line].to_vec());
    let lines = unstaged_lines(geo, o, spare);
    o.staged = n;
    o.gen = gen;
    st.slot_claimed_id = st.slot_claimed_id.max(id);
    let written_id = st.written_id;
    st.append_locked_us += locked.elapsed().as_micros() as u64;
    drop(st);
    let desc = inner.cache.describe();
    let t0 = Instant::now();
    // The crcs of lines `written..n` (those after `staged` are `tail`), and the header
    // recording them (its entries are kept for the segment once the append is durable).
    let header = |mut entries: Vec<crate::format::Entry>, tail: &[u8]| {
        let mut crc = old_crc;
        if let Some(s) = &staged_bytes {
            crc = crate::format::seal_lines(crc, &mut entries[written..staged], s);
        }
        let data_crc = crate::format::seal_lines(crc, &mut entries[staged..n], tail);
        SegmentHeader {
            id,
            lap: geo.lap(id),
            gen,
            nonce: inner.nonce,
            prev_crc,
            durable,
            data_crc,
            uuid: inner.uuid,
            entries,
        }
    };
    let mut side = None;
    // The one write of this thread: the lines with header copy 0 in front of them, or
    // the header alone while `lc-append-io` writes the lines.
    let (hdr, hcrc, head, head_off) = if gen == 1 && staged == 0 {
        let (mut b, off) = lines.expect("an append has lines to write");
        let hdr = header(entries, &b[ds..]);
        let hcrc = hdr.encode_into(&mut b[..hl]);
        (hdr, hcrc, b, off)
    } else {
        let lines = lines.map(|(b, off)| {
            let b = Arc::new(b);
            side = Some((
                inner.side.post(&*inner.cache, b.clone(), off),
                off,
                b.clone(),
            ));
            b
        });
        let tail = lines.as_deref().map_or(&[][..], |b| &b[..]);
        debug_assert_eq!(
            tail.len(),
            (n - staged) * line,
            "no header room after line 0"
        );
        let hdr = header(entries, tail);
        let mut h = AlignedBuf::new(hl);
        let hcrc = hdr.encode_into(&mut h);
        let off = geo.segment_offset(id) + (geo.header_copy(gen) * hl) as u64;
        (hdr, hcrc, h, off)
    };
    let mut r = inner
        .cache
        .write_at(&head, head_off)
        .map_err(|e| Error::io(&desc, head_off, e));
    let mut bytes = if r.is_ok() { head.len() as u64 } else { 0 };
    // The lines' buffer, kept for the next append once written.
    let mut lines_buf = None;
    if let Some((p, off, b)) = side {
        let s = inner.side.wait(p).map_err(|e| Error::io(&desc, off, e));
        if s.is_ok() {
            bytes += b.len() as u64;
        }
        r = r.and(s);
        // `lc-append-io` let go of its clone before it reported the write.
        lines_buf = Arc::try_unwrap(b).ok();
    } else if gen == 1 && staged == 0 {
        lines_buf = Some(head);
    }
    let t1 = Instant::now();
    let r = r.and_then(|_| inner.cache.flush().map_err(|e| Error::io(&desc, 0, e)));
    let t2 = Instant::now();
    let mut st = inner.lock();
    if st.append_buf.is_none() {
        st.append_buf = lines_buf;
    }
    st.cache_bytes_written += bytes;
    st.append_write_us += (t1 - t0).as_micros() as u64;
    st.append_flush_us += (t2 - t1).as_micros() as u64;
    match r {
        Ok(()) => {
            // Unless a seal took the segment meanwhile (its final header covers these
            // lines again, from `written` on).
            st.line_crcs
                .record(id, written, hdr.entries[written..n].iter().map(|e| e.crc));
            if let Some(o) = st.open.as_mut().filter(|o| o.id == id) {
                o.written = n;
                o.crc = hdr.data_crc;
                o.hcrc = hcrc;
                for (e, c) in o.entries[written..n]
                    .iter_mut()
                    .zip(&hdr.entries[written..n])
                {
                    e.crc = c.crc;
                }
            }
            st.flushed_id = st.flushed_id.max(written_id);
            st.partial = st.partial.max(Pos {
                id,
                lines: n as u32,
            });
            if st.written_id == st.flushed_id {
                st.unflushed_since = None;
            }
            st.appends += 1;
            st.last_append = Some(Instant::now());
        }
        Err(e) => fail(inner, &mut st, e),
    }
    inner.io_cv.notify_all();
    inner.worker_cv.notify_all();
    st
}

// Format 2, while flushes come often (an append in the last `STAGE_WINDOW`): the
// open segment's lines are written to its slot as they accumulate, at least the
// tunable `stage_lines` at a time (or whatever is there when a flush request waits
// for more writers), so the append a flush then needs writes little more than its
// header. A staged line is written, not durable: no header covers it until an append
// or the seal writes one, and the crcs in that header are what recovery checks it by.

/// True when the open segment's lines should be staged now.
fn stage_due(inner: &Inner, st: &State, now: Instant) -> bool {
    let Some(o) = st.open.as_ref() else {
        return false;
    };
    let (unstaged, every) = (o.entries.len() - o.staged, st.tunables.stage_lines as usize);
    inner.geo.appends()
        && every > 0
        && unstaged > 0
        && st.last_append.is_some_and(|t| now < t + STAGE_WINDOW)
        && (unstaged >= every || st.flush_req.is_some())
}

/// Writes the open segment's lines `staged..n` to its slot, through to the device (no
/// header, no flush); the
/// first staging of a segment writes zeros over both header copies with them, so no
/// older header of the slot outlives the lines written over its data. Lines `0..n`
/// are immutable from here. Called, like an append, only when the slot may be written
/// and every segment before the open one is written.
fn stage<'a>(inner: &'a Inner, mut st: MutexGuard<'a, State>) -> MutexGuard<'a, State> {
    let spare = st.append_buf.take();
    let o = st.open.as_mut().expect("open segment");
    let (id, from, n) = (o.id, o.staged, o.entries.len());
    let (buf, off) = unstaged_lines(&inner.geo, o, spare).expect("staging has lines to write");
    o.staged = n;
    st.slot_claimed_id = st.slot_claimed_id.max(id);
    drop(st);
    // Through to the device now (O_DIRECT), not into the page cache: the flush of the
    // append that follows then finds these lines on the device already.
    let r = inner
        .cache
        .write_through(&buf, off)
        .map_err(|e| Error::io(&inner.cache.describe(), off, e));
    let mut st = inner.lock();
    st.cache_bytes_written += buf.len() as u64;
    if st.append_buf.is_none() {
        st.append_buf = Some(buf);
    }
    st.staged_lines += (n - from) as u64;
    if let Err(e) = r {
        fail(inner, &mut st, e);
    }
    inner.io_cv.notify_all();
    st
}

/// The open segment's lines not yet on the device (`staged..n`), copied out into
/// `spare` (the buffer the last append or staging used, `State::append_buf`: no
/// allocation and no zeroing under the lock) or a new buffer, and where they go. From
/// line 0 the copy starts at the segment, its header copies zeros (see [`stage`]).
/// `None` when every line is on the device (and `spare` is dropped).
fn unstaged_lines(
    geo: &Geometry,
    o: &OpenSeg,
    spare: Option<AlignedBuf>,
) -> Option<(AlignedBuf, u64)> {
    let (ds, line) = (geo.data_start(), LINE as usize);
    let (from, n) = (o.staged, o.entries.len());
    if n == from {
        return None;
    }
    let (skip, off) = if from == 0 {
        (ds, geo.segment_offset(o.id))
    } else {
        (0, geo.line_offset(o.id, from as u32))
    };
    let len = skip + (n - from) * line;
    // Room for any later append of a segment, so one buffer serves them all.
    let mut b = spare.unwrap_or_else(|| AlignedBuf::new(geo.segment_size as usize));
    if !b.reuse(len) {
        b = AlignedBuf::new(len);
    }
    b[..skip].fill(0);
    b[skip..].copy_from_slice(&o.buf[ds + from * line..ds + n * line]);
    Some((b, off))
}

/// Written segments are flushed without a waiter after this long, bounding how much a
/// power cut can take of data nobody asked to be durable.
const UNFLUSHED_MAX_AGE: Duration = Duration::from_secs(1);
/// ... or once this many are written and not flushed.
const UNFLUSHED_MAX_SEGMENTS: u64 = 16;

/// True when written segments should be flushed although nobody waits for them.
fn flush_due(st: &State, now: Instant) -> bool {
    st.need_space
        || st.drains > 0
        || st.stop_flush
        || st.written_id - st.flushed_id >= UNFLUSHED_MAX_SEGMENTS
        || st
            .unflushed_since
            .is_some_and(|t| now >= t + UNFLUSHED_MAX_AGE)
        || (st.tunables.writeback_force && st.written_id > st.wb_id)
}

/// Flushes the cache device; on success every written segment is durable.
fn flush_device<'a>(inner: &'a Inner, st: MutexGuard<'a, State>) -> MutexGuard<'a, State> {
    let target = st.written_id;
    drop(st);
    let r = inner.cache.flush();
    let mut st = inner.lock();
    match r {
        Ok(()) => {
            st.flushed_id = target;
            if st.written_id == target {
                st.unflushed_since = None;
            }
        }
        Err(e) => fail(inner, &mut st, Error::io(&inner.cache.describe(), 0, e)),
    }
    inner.io_cv.notify_all();
    inner.worker_cv.notify_all();
    st
}

fn fail(inner: &Inner, st: &mut State, e: Error) {
    error!(inner.log, "cache device write failed; cache stops accepting writes"; "error" => %e);
    inner.fail(st, e);
}
