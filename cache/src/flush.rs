//! The flusher thread (`lc-flush`): seals the open segment when a flush waits past
//! `barrier_deadline_ms`, when it has been idle for `flush_interval_s`, or on request;
//! writes sealed segments to their ring slots in id order (each as one sequential
//! write), flushes the cache device once per batch, then advances `flushed_id`, returns
//! the buffers to the pool and wakes the waiters.
//!
//! A segment is written only when its slot is free (`id <= wb_id + nr_segments`); if
//! not, the flusher raises `need_space` so the writeback thread runs, and waits.

use std::sync::Arc;
use std::time::{Duration, Instant};

use slog::{error, info};

use crate::device::AlignedBuf;
use crate::engine::{Inner, Sealed};
use crate::error::Error;

/// Body of the flusher thread.
pub(crate) fn run(inner: &Inner) {
    let mut st = inner.lock();
    loop {
        let now = Instant::now();
        let open_lines = st.open.as_ref().map_or(0, |o| o.entries.len());
        if open_lines > 0 {
            let deadline_due = st.flush_req.is_some_and(|(t, target)| {
                let open_id = st.open.as_ref().map_or(0, |o| o.id);
                target >= open_id
                    && now >= t + Duration::from_millis(st.tunables.barrier_deadline_ms as u64)
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
        // Collect the next run of sealed segments whose slots are free.
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
            if st.stop_flush
                && (st.ram.is_empty() || st.failed.is_some())
                && (st.open.as_ref().is_none_or(|o| o.entries.is_empty()) || st.failed.is_some())
            {
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
        if result.is_ok() {
            if let Err(e) = inner.cache.flush() {
                result = Err(Error::io(&inner.cache.describe(), 0, e));
            }
        }
        st = inner.lock();
        st.cache_bytes_written += bytes;
        match result {
            Ok(()) => {
                st.flushed_id = last;
                // Readers copy under the lock and keep no clone, so once the batch's
                // clones are gone each segment's buffer comes back to the pool.
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
            Err(e) => {
                error!(inner.log, "cache device write failed; cache stops accepting writes";
                       "error" => %e);
                st.failed = Some(e.to_string());
            }
        }
        inner.io_cv.notify_all();
        inner.worker_cv.notify_all();
    }
    info!(inner.log, "flusher stopped"; "last_flushed_id" => st.flushed_id);
    drop(st);
}
