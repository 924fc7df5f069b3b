//! The flusher thread (`lc-flush`): seals the open segment when a flush waits past
//! `barrier_deadline_ms`, when it has been idle for `flush_interval_s`, or on request;
//! writes sealed segments to their ring slots in id order (each as one sequential
//! write) and returns their buffers to the pool (`written_id`); flushes the cache device
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
use crate::state::{Inner, Sealed, State};

/// Body of the flusher thread.
pub(crate) fn run(inner: &Inner) {
    let mut st = inner.lock();
    loop {
        let now = Instant::now();
        let open_lines = st.open.as_ref().map_or(0, |o| o.entries.len());
        if open_lines > 0 {
            let deadline_due = st.flush_req.is_some_and(|(t, target)| {
                let open_id = st.open.as_ref().map_or(0, |o| o.id);
                // Wait for more lines only while some writer could still add them.
                target >= open_id
                    && (st.active_writers == 0
                        || now >= t + Duration::from_millis(st.tunables.barrier_deadline_ms as u64))
            });
            let idle = st.tunables.flush_interval_s > 0
                && st.open.as_ref().is_some_and(|o| {
                    now >= o.last_write + Duration::from_secs(st.tunables.flush_interval_s as u64)
                });
            if deadline_due || idle || st.seal_requested || st.stop_flush {
                inner.seal(&mut st);
            }
        }
        st.seal_requested = false;
        if st
            .flush_req
            .is_some_and(|(_, target)| st.open.as_ref().is_none_or(|o| o.id > target))
        {
            // Everything the request waits for is sealed; the writes below satisfy it.
            st.flush_req = None;
        }
        // 1. A flush someone waits for, once what they wait for is written.
        let wanted =
            st.durable_req > st.flushed_id && st.written_id >= st.durable_req.min(st.next_id - 1);
        if st.written_id > st.flushed_id && st.failed.is_none() && (wanted || flush_due(&st, now)) {
            st = flush_device(inner, st);
            continue;
        }
        // 2. The next run of sealed segments whose slots are free.
        let limit = st.wb_id + inner.geo.nr_segments;
        let batch: Vec<Arc<Sealed>> = st
            .ram
            .range(st.write_started_id + 1..)
            .take_while(|(id, _)| **id <= limit)
            .map(|(_, s)| s.clone())
            .collect();
        let blocked = st.ram.range(st.write_started_id + 1..).next().is_some() && batch.is_empty();
        if blocked && !st.need_space {
            st.need_space = true;
            inner.worker_cv.notify_all();
        }
        if batch.is_empty() || st.failed.is_some() {
            let nothing_left = st.ram.is_empty()
                && st.open.as_ref().is_none_or(|o| o.entries.is_empty())
                && st.written_id == st.flushed_id;
            if st.stop_flush && (nothing_left || st.failed.is_some()) {
                break;
            }
            // Sleep until work arrives or the next timer fires.
            let mut wait = Duration::from_secs(1);
            if let Some((t, _)) = st.flush_req {
                let due = t + Duration::from_millis(st.tunables.barrier_deadline_ms as u64);
                wait = wait.min(due.saturating_duration_since(now));
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
            st = inner
                .worker_cv
                .wait_timeout(st, wait.max(Duration::from_micros(100)))
                .unwrap_or_else(|e| e.into_inner())
                .0;
            continue;
        }
        let last = batch.last().expect("batch").id;
        st.write_started_id = last;
        drop(st);
        let mut bytes = 0u64;
        let mut result = Ok(());
        for seg in &batch {
            let off = inner.geo.segment_offset(seg.id);
            if let Err(e) = inner.cache.write_at(&seg.buf[..seg.len], off) {
                result = Err(Error::io(&inner.cache.describe(), off, e));
                break;
            }
            bytes += seg.len as u64;
        }
        st = inner.lock();
        st.cache_bytes_written += bytes;
        match result {
            Ok(()) => {
                st.written_id = last;
                st.unflushed_since.get_or_insert(Instant::now());
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
    drop(st);
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
    st.failed = Some(e.to_string());
}
