//! The writeback thread (`lc-writeback`, dm-lc's "migration"): takes up to
//! `writeback_batch` flushed segments after `wb_id`, reads them back from the cache
//! device, picks the copies that must reach the backing devices, sorts them by
//! (device, sector) and merges adjacent runs, writes them, flushes the backing devices,
//! persists the new `wb_id` in the superblock, and only then drops the written-back
//! lines from the index and lets the flusher reuse their slots.
//!
//! Which copy of a line is written back: the copy in segment S is written if the index
//! still points at it, or if the newest copy lives in a segment that was not yet flushed
//! when the batch was planned (the old copy is then the durable one and must not be
//! lost when S's slot is reused). A copy superseded by a flushed newer copy is skipped.
//!
//! Also runs the periodic superblock commit, and the cleaner (`clean.rs`) first on each
//! turn: it frees tail segments by moving their live lines when that is cheaper, and
//! hands the thread the tail segments to write back otherwise.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use slog::{info, warn};

use crate::clean::{dirty_pct, Cleaner, Step};
use crate::device::{AlignedBuf, BlockDevice};
use crate::error::Error;
use crate::format::{SegmentHeader, LINE, SECTOR, SECTORS_PER_LINE};
use crate::index::{key, Loc};
use crate::logio::{commit, found_rot, read_segments, rotten_copies, unlisted};
use crate::state::{BackingFailure, Inner, Pos, State};

/// One line copy picked for writeback.
struct Item {
    dev: u8,
    sector: u64,
    dirty: u8,
    tomb: bool,
    /// A clean copy: the backing device holds it already; not written, only released.
    clean: bool,
    seg: u64,
    slot: u16,
    data_off: usize,
    buf: usize,
}

/// Pause before the first retry of a writeback that failed on a backing device; it
/// doubles with each failure up to [`MAX_RETRY_DELAY`].
const RETRY_DELAY: Duration = Duration::from_millis(100);
/// Longest pause between retries of a failing backing device.
const MAX_RETRY_DELAY: Duration = Duration::from_secs(5);

fn should_run(inner: &Inner, st: &State) -> bool {
    if st.wb_id >= st.flushed_id.min(st.damage.writeback_limit(st.flushed_id)) {
        return false;
    }
    let t = &st.tunables;
    t.writeback_force
        || st.need_space
        || st.drains > 0
        || (t.writeback_enabled && dirty_pct(&inner.geo, st) > t.writeback_threshold as u64)
}

/// Body of the writeback thread.
pub(crate) fn run(inner: &Inner) {
    let mut last_commit = Instant::now();
    // When the last batch failed on a backing device, and the pause before the retry.
    let mut last_error: Option<(Instant, Duration)> = None;
    let mut cleaner = Cleaner::default();
    // Whether the last flush of changed backing devices failed (warned once).
    let mut settle_failed = false;
    let mut st = inner.lock();
    loop {
        let interval = Duration::from_secs(st.tunables.superblock_commit_interval_s as u64);
        let stopping = st.stop_writeback;
        if st.failed.is_none()
            && (st.commit_requested || last_commit.elapsed() >= interval || stopping)
        {
            st.commit_requested = false;
            drop(st);
            if let Err(e) = commit(inner, None) {
                warn!(inner.log, "superblock commit failed"; "error" => %e);
            }
            last_commit = Instant::now();
            st = inner.lock();
            inner.io_cv.notify_all();
        }
        if stopping {
            break;
        }
        let backoff = last_error
            .filter(|(t, pause)| t.elapsed() < *pause)
            .map(|(t, pause)| pause - t.elapsed());
        // The cleaner first: it frees log slots by moving live lines when the log runs
        // short, and asks for writeback of the tail only when moving does not pay.
        let mut range = None;
        if st.failed.is_none() {
            match cleaner.step(inner, st) {
                Step::Worked => {
                    st = inner.lock();
                    continue;
                }
                Step::Writeback { first, last } => {
                    range = Some((first, last));
                    st = inner.lock();
                }
                // Still the hold the cleaner found no pressure in: a writer short of
                // space now would have had a move.
                Step::Idle(g) => st = g,
            }
        }
        if st.stop_writeback {
            // Asked to stop while the cleaner had the lock released: the top of the
            // loop commits and exits. A stop never starts a writeback batch.
            continue;
        }
        if range.is_some() && backoff.is_none() && st.failed.is_none() {
            // Checked again under the lock: the cleaner released it.
            range = range.filter(|&(first, _)| first == st.wb_id + 1);
        } else {
            range = None;
        }
        if range.is_none() && (backoff.is_some() || !should_run(inner, &st) || st.failed.is_some())
        {
            if st.failed.is_none() && Inner::backing_unsettled(&st) {
                // Discards and writes around the cache become durable on their device
                // without waiting for a flush request (promotions of it wait for that).
                drop(st);
                match inner.flush_backing() {
                    Ok(()) => settle_failed = false,
                    Err(e) if !settle_failed => {
                        settle_failed = true;
                        warn!(inner.log, "flushing a backing device failed; retrying"; "error" => %e);
                    }
                    Err(_) => {}
                }
                st = inner.lock();
            }
            st = inner
                .worker_cv
                .wait_timeout(st, backoff.unwrap_or(Duration::from_millis(500)))
                .unwrap_or_else(|e| e.into_inner())
                .0;
            continue;
        }
        let (first, mut last) = range.unwrap_or_else(|| {
            (
                st.wb_id + 1,
                st.flushed_id
                    .min(st.wb_id + st.tunables.writeback_batch as u64)
                    .min(st.damage.writeback_limit(st.flushed_id)),
            )
        });
        let sort = st.tunables.writeback_sort;
        // Damaged segments hold nothing that can be written back, unless a line of
        // theirs was indexed (an older append recovery kept, the intact lines of a
        // segment with rotten ones): those are read and written back as any.
        let mut skip: Vec<u64> = st
            .damage
            .segments
            .range(first..=last)
            .filter(|&&id| st.index.seg_lines(id).lines == 0)
            .copied()
            .collect();
        // A segment whose header became unreadable while serving holds nothing the
        // index points at; it is passed unread once every line written before it was
        // found is durable (a line superseded before then has its newer copy durable,
        // so its copy there is not needed). Until then the batch stops before it.
        for (&id, &head) in st.unreadable.range(first..=last) {
            if st.durable_pos() >= head {
                skip.push(id);
            } else {
                last = id - 1;
                break;
            }
        }
        if last < first {
            last_error = Some((Instant::now(), RETRY_DELAY));
            continue;
        }
        drop(st);
        match write_back(inner, first, last, &skip, sort) {
            Ok(()) => {
                last_error = None;
                last_commit = Instant::now();
            }
            Err(WbError::Cache(e)) => {
                warn!(inner.log, "cache device failed during writeback; cache stops"; "error" => %e);
                inner.fail(&mut inner.lock(), e);
            }
            Err(WbError::Rotten) => {
                // Recorded as damage (the next batch stops before it), or waiting for
                // a newer copy's flush: retried after a pause (doubling while it waits).
                let pause = last_error.map_or(RETRY_DELAY, |(_, p)| (p * 2).min(MAX_RETRY_DELAY));
                last_error = Some((Instant::now(), pause));
            }
            Err(WbError::Backing(failures)) => {
                let mut st = inner.lock();
                for (dev, e) in failures {
                    let Some(b) = st.backing[dev as usize].as_mut() else {
                        continue;
                    };
                    match &mut b.failing {
                        Some(f) => f.error = Arc::new(e),
                        None => {
                            warn!(inner.log, "writeback to a backing device failing; its dirty data stays in the cache, retrying";
                                  "dev" => dev, "label" => &b.label, "segments" => format!("{first}..={last}"), "error" => %e);
                            b.failing = Some(BackingFailure {
                                since: Instant::now(),
                                since_wall: std::time::SystemTime::now(),
                                error: Arc::new(e),
                            });
                        }
                    }
                }
                // Waiters re-check whether their write is now refused.
                inner.io_cv.notify_all();
                drop(st);
                let pause = last_error.map_or(RETRY_DELAY, |(_, p)| (p * 2).min(MAX_RETRY_DELAY));
                last_error = Some((Instant::now(), pause));
            }
        }
        st = inner.lock();
    }
    info!(inner.log, "writeback stopped"; "last_writeback_id" => st.wb_id);
}

/// A writeback failure: on the cache device (fatal), on backing devices (each
/// failing device with its error; retried), or a copy to write back that failed its
/// check (recorded as damage, or waiting for a newer copy's flush; retried).
enum WbError {
    Cache(Error),
    Backing(Vec<(u8, Error)>),
    Rotten,
}

fn write_back(
    inner: &Inner,
    first: u64,
    last: u64,
    skip: &[u64],
    sort: bool,
) -> Result<(), WbError> {
    let gens: BTreeMap<u64, u16> = {
        let st = inner.lock();
        st.recovered_gens
            .range(first..=last)
            .map(|(&k, &v)| (k, v))
            .collect()
    };
    let (bufs, headers, rots) = match read_segments(inner, first, last, skip, &gens) {
        Ok(r) => r,
        Err(e @ Error::Rotten { segment, .. }) => {
            // No readable header: every copy the index holds in it is lost, and it is
            // passed unread once what was written before now is durable.
            found_rot(inner, &e, segment, None);
            let mut st = inner.lock();
            let head = st.last_written_pos();
            st.unreadable.entry(segment).or_insert(head);
            inner.request_durable(&mut st, head);
            return Err(WbError::Rotten);
        }
        Err(e) => return Err(WbError::Cache(e)),
    };
    let items = write_items(inner, last, &bufs, &headers, &rots, sort)?;
    {
        // Every device of the batch took its lines: none of them is failing now.
        let mut st = inner.lock();
        for it in items.iter().filter(|it| !it.clean) {
            if let Some(b) = st.backing[it.dev as usize].as_mut() {
                if b.failing.take().is_some() {
                    info!(inner.log, "writeback to a backing device recovered"; "dev" => it.dev, "label" => &b.label);
                }
            }
        }
    }
    // Persist progress, then release the lines and the slots.
    commit(inner, Some(last)).map_err(WbError::Cache)?;
    let mut st = inner.lock();
    st.wb_id = last;
    st.damage.passed(last);
    st.unreadable = st.unreadable.split_off(&(last + 1));
    st.recovered_gens = st.recovered_gens.split_off(&(last + 1));
    st.clean.written_back_lines += items.iter().filter(|it| !it.clean).count() as u64;
    for it in &items {
        let k = key(it.dev, it.sector / SECTORS_PER_LINE);
        let loc = Loc {
            seg: it.seg,
            slot: it.slot,
            dirty: it.dirty,
            tomb: it.tomb,
            clean: it.clean,
        };
        if st.index.remove_if(k, loc) && !it.clean {
            if let Some(b) = st.backing[it.dev as usize].as_mut() {
                b.dirty = b.dirty.saturating_sub(1);
            }
        }
    }
    st.index.forget_segments(last);
    st.need_space = false;
    inner.io_cv.notify_all();
    inner.worker_cv.notify_all();
    Ok(())
}

/// Picks the copies to write back, writes them (sorted and merged when `sort`) and
/// flushes the backing devices. Returns the copies written, or every device that
/// failed with its error (the other devices' copies were written and flushed). A copy
/// to write back that is in `rots` (per segment, the slots whose line failed its
/// check) stops the batch before anything is written: the live ones are lost, and a
/// stale one waits for its newer copy's flush (docs/FORMAT.md, "Damage found while
/// serving"). So does damage found meanwhile that holds segments up to `last` (the
/// batch's end) back.
fn write_items(
    inner: &Inner,
    last: u64,
    bufs: &[AlignedBuf],
    headers: &[SegmentHeader],
    rots: &[Vec<usize>],
    sort: bool,
) -> Result<Vec<Item>, WbError> {
    let hl = inner.geo.data_start();
    // Decide, under the lock, which copies to write.
    let mut items: Vec<Item> = Vec::new();
    let devs: HashMap<u8, Arc<dyn BlockDevice>>;
    // Newer copies' data taken from RAM (items past `bufs`).
    let mut newer: Vec<AlignedBuf> = Vec::new();
    {
        let mut st = inner.lock();
        let flushed = st.flushed_id;
        // A loss found since the batch was planned (a read, the cleaner, the scrub)
        // holds the evidence: its copy left the index, so the loop below would not
        // take it and the batch would pass its segment before the loss is recorded.
        // Planned again, the batch stops before it.
        if last > st.damage.writeback_limit(flushed) {
            return Err(WbError::Rotten);
        }
        let mut pos: HashMap<u64, usize> = HashMap::new();
        // Rotten copies: the live ones per segment, and whether a stale one is needed.
        let mut lost: Vec<(u64, Vec<(u64, u16)>)> = Vec::new();
        let mut wait = false;
        for (b, h) in headers.iter().enumerate() {
            for (slot, e) in h.entries.iter().enumerate() {
                let k = e.line_key();
                let newest = st.index.get(k);
                // An older copy is written back while its newer one is not durable
                // (a crash may take that one), unless the newer one is a clean copy:
                // the backing device holds its data already.
                let take = match newest {
                    Some(l) if l.seg == h.id && l.slot as usize == slot => true,
                    Some(l) => l.seg > h.id && l.seg > flushed && !l.clean,
                    None => false,
                };
                if !take {
                    continue;
                }
                if rots[b].binary_search(&slot).is_ok() {
                    match newest {
                        Some(l) if l.seg == h.id => match lost.last_mut() {
                            Some((seg, c)) if *seg == h.id => c.push((k, slot as u16)),
                            _ => lost.push((h.id, vec![(k, slot as u16)])),
                        },
                        Some(l) => {
                            // The older copy was needed in case the newer one does not
                            // become durable, so the batch waits for that. But when the
                            // newer copy's segment waits for a slot beyond the ring
                            // (possibly the one this batch frees: waiting would be
                            // forever) and it can no longer change (a sealed segment,
                            // or a line of the open one already staged), its data is
                            // written back instead: a later value is what a crash may
                            // leave.
                            let open = st.open.as_ref().filter(|o| o.id == l.seg);
                            let fixed = l.seg > st.wb_id + inner.geo.nr_segments
                                && open.is_none_or(|o| (l.slot as usize) < o.staged);
                            if let Some(data) = fixed.then(|| inner.ram_slice(&st, l)).flatten() {
                                let mut b = AlignedBuf::new(LINE as usize);
                                b.copy_from_slice(data);
                                newer.push(b);
                                let it = Item {
                                    dev: e.dev,
                                    sector: e.sector,
                                    dirty: l.dirty,
                                    tomb: l.tomb,
                                    clean: false,
                                    seg: l.seg,
                                    slot: l.slot,
                                    data_off: 0,
                                    buf: bufs.len() + newer.len() - 1,
                                };
                                match pos.get(&k) {
                                    Some(&i) => items[i] = it,
                                    None => {
                                        pos.insert(k, items.len());
                                        items.push(it);
                                    }
                                }
                                continue;
                            }
                            // Writeback counts a copy durable once its segment is
                            // written whole: the open one is sealed for it.
                            inner.request_durable(&mut st, Pos::all(l.seg));
                            st.seal_requested |= st.open.as_ref().is_some_and(|o| o.id == l.seg);
                            wait = true;
                        }
                        None => {}
                    }
                    continue;
                }
                let it = Item {
                    dev: e.dev,
                    sector: e.sector,
                    dirty: e.dirty,
                    tomb: e.is_tombstone(),
                    clean: e.is_clean(),
                    seg: h.id,
                    slot: slot as u16,
                    data_off: hl + slot * LINE as usize,
                    buf: b,
                };
                // A later copy in this batch replaces an earlier one.
                match pos.get(&k) {
                    Some(&i) => items[i] = it,
                    None => {
                        pos.insert(k, items.len());
                        items.push(it);
                    }
                }
            }
        }
        for h in headers {
            let missing = unlisted(&st, h);
            if !missing.is_empty() {
                lost.push((h.id, missing));
            }
        }
        if !lost.is_empty() || wait {
            drop(st);
            // Each copy is checked again under the lock `found_rot` takes: one
            // superseded meanwhile is stale now, and the retry sees it as such.
            for (seg, copies) in &lost {
                rotten_copies(inner, *seg, copies);
            }
            return Err(WbError::Rotten);
        }
        devs = st
            .backing
            .iter()
            .enumerate()
            .filter_map(|(i, b)| b.as_ref().map(|b| (i as u8, b.dev.clone())))
            .collect();
    }
    if sort {
        items.sort_by_key(|i| (i.dev, i.sector));
    }
    // 3. Write: runs of dirty sectors, merged across adjacent lines. A device that
    // fails is skipped from then on; the others are still written and flushed.
    let mut written = 0u64;
    let mut touched: Vec<u8> = Vec::new();
    let mut failed: Vec<(u8, Error)> = Vec::new();
    let mut run: Vec<u8> = Vec::new();
    let mut run_start: Option<(u8, u64)> = None; // (dev, first sector)
    let device = |dev: u8| {
        devs.get(&dev)
            .ok_or_else(|| Error::Invalid(format!("dirty data for detached backing device {dev}")))
    };
    let flush_run = |run: &mut Vec<u8>,
                     start: &mut Option<(u8, u64)>,
                     written: &mut u64,
                     failed: &mut Vec<(u8, Error)>| {
        if let Some((dev, sector)) = start.take() {
            let off = sector * SECTOR;
            let r = device(dev).and_then(|d| {
                d.write_at(run, off)
                    .map_err(|e| Error::io(&d.describe(), off, e))
            });
            match r {
                Ok(()) => *written += run.len() as u64,
                Err(e) => failed.push((dev, e)),
            }
            run.clear();
        }
    };
    for it in &items {
        if it.clean || failed.iter().any(|(d, _)| *d == it.dev) {
            continue;
        }
        if !touched.contains(&it.dev) {
            touched.push(it.dev);
        }
        if it.tomb {
            flush_run(&mut run, &mut run_start, &mut written, &mut failed);
            let off = it.sector * SECTOR;
            let r = device(it.dev).and_then(|d| {
                d.discard(off, LINE)
                    .map_err(|e| Error::io(&d.describe(), off, e))
            });
            if let Err(e) = r {
                failed.push((it.dev, e));
            }
            continue;
        }
        let b = bufs
            .get(it.buf)
            .unwrap_or_else(|| &newer[it.buf - bufs.len()]);
        let data = &b[it.data_off..it.data_off + LINE as usize];
        for sec in 0..SECTORS_PER_LINE {
            if it.dirty & (1 << sec) == 0 {
                flush_run(&mut run, &mut run_start, &mut written, &mut failed);
                continue;
            }
            let sector = it.sector + sec;
            let contiguous = matches!(run_start, Some((d, st)) if d == it.dev && st + (run.len() as u64 / SECTOR) == sector);
            if !contiguous {
                flush_run(&mut run, &mut run_start, &mut written, &mut failed);
                run_start = Some((it.dev, sector));
            }
            let lo = (sec * SECTOR) as usize;
            run.extend_from_slice(&data[lo..lo + SECTOR as usize]);
        }
    }
    flush_run(&mut run, &mut run_start, &mut written, &mut failed);
    for &dev in &touched {
        if failed.iter().any(|(d, _)| *d == dev) {
            continue;
        }
        if let Ok(d) = device(dev) {
            if let Err(e) = d.flush() {
                failed.push((dev, Error::io(&d.describe(), 0, e)));
            }
        }
    }
    inner.lock().backing_bytes_written += written;
    if !failed.is_empty() {
        return Err(WbError::Backing(failed));
    }
    Ok(items)
}
