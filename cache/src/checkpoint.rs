//! Checkpoints of the index (format 2, `docs/FORMAT.md` "Checkpoint"): the
//! `lc-checkpoint` thread writes one every `checkpoint_interval_segments` durable
//! segments, and `Cache::close` one more after the flusher stopped, so that recovery
//! loads the snapshot and replays only the segments written after it.
//!
//! The snapshot is the index as of one seal (the open segment is sealed under the lock;
//! `U` is the last sealed segment), copied in chunks of [`CHUNK`] table slots, one lock
//! hold each, while the index journals the old value of every key changed or moved
//! meanwhile ([`crate::index::Index::begin_snapshot`]). It is written into the area the
//! newest valid checkpoint does not occupy, only once `U` is durable, entries first,
//! then the header, then the cache device is flushed.

use std::time::Duration;

use slog::{info, warn};

use crate::device::AlignedBuf;
use crate::error::{Error, Result};
use crate::format::{lost_record, CheckpointHeader, CP_ENTRY, CP_HEADER, LINE};
use crate::state::{Inner, Pos, State};

/// Table slots copied per lock hold (1 MiB).
pub(crate) const CHUNK: usize = 64 << 10;
/// Bytes of entries written per device write.
const WRITE_CHUNK: usize = 4 << 20;

/// True when recovery's damage state allows a checkpoint: the lost sectors are in it
/// (loss records), the lines of an unreadable header are not (nobody knows them). (Nor
/// are the generations recovery took segments at: while there are any, only a record
/// without an index is written, see [`write`].)
fn eligible(st: &State) -> bool {
    st.failed.is_none() && st.damage.unknown_upto == 0
}

/// Body of the checkpoint thread.
pub(crate) fn run(inner: &Inner) {
    let mut st = inner.lock();
    loop {
        if st.stop_checkpoint {
            break;
        }
        let n = st.tunables.checkpoint_interval_segments as u64;
        let periodic = n > 0 && st.flushed_id >= st.cp_upto + n;
        let flushed = st.flushed_id;
        st.damage.heals_durable(flushed);
        // A change to the lost set is recorded at once, checkpoints on or off
        // (docs/FORMAT.md, "Loss records").
        let record = st.damage.needs_record(st.flushed_id);
        if inner.geo.appends() && (periodic || record) && eligible(&st) {
            drop(st);
            let r = write(inner);
            st = inner.lock();
            if record {
                // Writers blocked behind the damage wait for the record, or fail.
                st.record_failed = r.is_err();
                inner.io_cv.notify_all();
            }
            let wrote = r.unwrap_or_else(|e| {
                warn!(inner.log, "checkpoint failed"; "error" => %e);
                false
            });
            if wrote {
                continue;
            }
            if record
                && !st.damage.unresolved()
                && st.damage.needs_record(st.flushed_id)
                && !st.cp_busy
            {
                // Nothing is lost any more, but no checkpoint can be written now (sealed
                // segments wait beyond the ring, or recovery's uncertain last segment):
                // retiring the checkpoints removes the stale records as well.
                st.cp_busy = true;
                drop(st);
                let r = zero_headers(inner);
                st = inner.lock();
                st.cp_busy = false;
                retired_or_fail(inner, &mut st, r);
                if st.failed.is_none() {
                    st.damage.records_retired();
                    inner.worker_cv.notify_all();
                }
                continue;
            }
        }
        st = inner
            .worker_cv
            .wait_timeout(st, Duration::from_secs(1))
            .unwrap_or_else(|e| e.into_inner())
            .0;
    }
}

/// Writes a checkpoint now (format 2, when recovery's damage state allows it and
/// something was logged since the last one). Returns whether one was written.
pub(crate) fn write(inner: &Inner) -> Result<bool> {
    let geo = &inner.geo;
    if !geo.appends() {
        return Ok(false);
    }
    let (snap, upto, upto_crc, wb, seq, lost, changes) = {
        let mut st = inner.lock();
        if st.cp_busy || !eligible(&st) {
            return Ok(false);
        }
        inner.seal(&mut st);
        // The last sealed segment (an open segment left has no lines: it may never be
        // written).
        let upto = st.open.as_ref().map_or(st.next_id, |o| o.id) - 1;
        let record = st.damage.needs_record(st.flushed_id);
        // No index (a record alone, when a loss needs recording) while:
        // - sealed segments wait in RAM for a slot beyond the ring (the cleaner off,
        //   writeback failing, or held back by damage not yet recorded): they may never
        //   be written, and the area holds the ring's lines, no more (nor can it stop at
        //   the ring's end: the snapshot holds each line's newest copy, so a line whose
        //   newest copy waits in RAM would be missing its older durable one);
        // - everything sealed was written back: nothing to index;
        // - recovery's state is not in an index: the generations it took segments at,
        //   the last segment it took at an uncertain header (its final header is not
        //   known).
        let record_only = upto > st.wb_id + geo.nr_segments
            || upto <= st.wb_id
            || !st.recovered_gens.is_empty()
            || (st.unclaimed != 0 && upto <= st.unclaimed);
        // The lost set as of this instant (docs/FORMAT.md, "Loss records"). With an
        // index, `upto` is durable before the checkpoint is written; a record alone
        // applies from the durable point on instead, and lists as lost what copies
        // after it healed.
        let durable = if record_only {
            st.flushed_id.max(st.wb_id)
        } else {
            upto
        };
        let lost = st.damage.record(durable);
        if record_only && (!record || lost.is_empty()) {
            return Ok(false);
        }
        // Nothing new (unless the lost set changed: its record is due).
        if !record_only && upto <= st.cp_upto.max(st.wb_id) && !record {
            return Ok(false);
        }
        st.cp_busy = true;
        let snap = (!record_only).then(|| st.index.begin_snapshot());
        let changes = st.damage.changes;
        // The crc of segment `upto`'s final header: known now if the flusher already
        // wrote it (then it is the newest), else once it writes the segment
        // (`flush.rs`). A record alone chains nothing.
        let upto_crc = if record_only {
            Some(0)
        } else if st.written_id == upto {
            Some(st.prev_crc)
        } else {
            st.cp_crc_want = Some(upto);
            st.cp_crc_got = None;
            None
        };
        (
            snap,
            durable,
            upto_crc,
            st.wb_id,
            st.cp_seq + 1,
            lost,
            changes,
        )
    };
    let record_only = snap.is_none();
    let r = (|| -> Result<(u64, usize)> {
        let mut entries = match snap {
            Some(mut snap) => {
                let journal = loop {
                    let mut st = inner.lock();
                    if !st.index.snapshot_chunk(&mut snap, CHUNK) {
                        break st.index.end_snapshot();
                    }
                };
                let mut entries = snap.merge(journal);
                entries.retain(|&(_, v)| crate::index::Loc::unpack(v).seg > wb);
                debug_assert!(entries
                    .iter()
                    .all(|&(_, v)| crate::index::Loc::unpack(v).seg <= upto));
                entries
            }
            None => Vec::new(),
        };
        // The area holds the ring's lines: a record that does not fit with them (every
        // slot of the ring live, and losses besides) keeps the evidence instead.
        if entries.len() + lost.len() > geo.total_lines() as usize {
            return Err(Error::Invalid(format!(
                "checkpoint: {} entries and {} loss records exceed the area",
                entries.len(),
                lost.len()
            )));
        }
        entries.extend(lost.iter().map(|&(k, b)| (k, lost_record(upto, b))));
        if !record_only {
            inner.wait_durable(Pos::all(upto))?;
        }
        let (durable_id, upto_crc) = {
            let st = inner.lock();
            let crc = upto_crc.or(st.cp_crc_got).ok_or_else(|| {
                Error::Invalid(format!("checkpoint: no header crc of segment {upto}"))
            })?;
            (st.durable_claim(), crc)
        };
        let area = seq % 2;
        let base = geo.checkpoint_offset(area);
        let desc = inner.cache.describe();
        let mut crc = 0u32;
        let mut bytes = 0u64;
        let per = WRITE_CHUNK / CP_ENTRY;
        for (i, chunk) in entries.chunks(per).enumerate() {
            let len = chunk.len() * CP_ENTRY;
            let mut b = AlignedBuf::new((len as u64).div_ceil(LINE) as usize * LINE as usize);
            for (j, (k, v)) in chunk.iter().enumerate() {
                b[j * CP_ENTRY..j * CP_ENTRY + 8].copy_from_slice(&k.to_le_bytes());
                b[j * CP_ENTRY + 8..j * CP_ENTRY + 16].copy_from_slice(&v.to_le_bytes());
            }
            crc = crc32c::crc32c_append(crc, &b[..len]);
            let off = base + CP_HEADER as u64 + (i * WRITE_CHUNK) as u64;
            inner
                .cache
                .write_at(&b, off)
                .map_err(|e| Error::io(&desc, off, e))?;
            bytes += b.len() as u64;
        }
        let h = CheckpointHeader {
            uuid: inner.uuid,
            seq,
            last_writeback_id: wb,
            upto,
            upto_crc,
            entries_crc: crc,
            nr_entries: entries.len() as u64,
            durable_id,
            nr_segments: geo.nr_segments,
            nr_lost: lost.len() as u64,
            record_only,
        };
        let mut hb = AlignedBuf::new(CP_HEADER);
        hb.copy_from_slice(&h.encode());
        // Never a header recovery would refuse: a loss record in it would be lost.
        CheckpointHeader::decode(&hb, geo, &inner.uuid, area)
            .map_err(|why| Error::Invalid(format!("checkpoint {seq} not written: {why}")))?;
        inner
            .cache
            .write_at(&hb, base)
            .and_then(|_| inner.cache.flush())
            .map_err(|e| Error::io(&desc, base, e))?;
        Ok((bytes + CP_HEADER as u64, entries.len()))
    })();
    let mut st = inner.lock();
    st.cp_busy = false;
    st.cp_crc_want = None;
    st.cp_crc_got = None;
    // A snapshot cut short by an error stops journaling.
    let _ = st.index.end_snapshot();
    match r {
        Ok((bytes, n)) => {
            st.cp_seq = seq;
            if !record_only {
                st.cp_upto = upto;
            }
            st.checkpoints += 1;
            st.cache_bytes_written += bytes;
            if inner.geo.appends() {
                st.damage.record_written(changes, upto, !lost.is_empty());
                // Writeback may pass the evidence once the record is complete.
                inner.worker_cv.notify_all();
            }
            info!(inner.log, "checkpoint written"; "seq" => seq, "upto" => upto, "entries" => n,
                  "loss_records" => lost.len());
            Ok(true)
        }
        Err(e) => {
            if let Some(copy) = e.copy_io() {
                // A cache device that fails a write fails the cache, as elsewhere (unless
                // it already failed).
                st.failed.get_or_insert_with(|| copy.into());
                inner.io_cv.notify_all();
                inner.worker_cv.notify_all();
            }
            Err(e)
        }
    }
}

/// Writes zeros over both checkpoint area headers, then flushes the cache device.
fn zero_headers(inner: &Inner) -> Result<()> {
    let desc = inner.cache.describe();
    for area in 0..2 {
        let off = inner.geo.checkpoint_offset(area);
        inner
            .cache
            .write_at(&AlignedBuf::new(CP_HEADER), off)
            .map_err(|e| Error::io(&desc, off, e))?;
    }
    inner.cache.flush().map_err(|e| Error::io(&desc, 0, e))
}

/// After [`zero_headers`]: logged, and an I/O error fails the cache (a checkpoint left
/// on the device would bring back loss records nobody needs).
fn retired_or_fail(inner: &Inner, st: &mut State, r: Result<()>) {
    match r {
        Ok(()) => info!(
            inner.log,
            "checkpoints retired: the next recovery walks the whole log"
        ),
        Err(e) => {
            warn!(inner.log, "retiring the checkpoints failed; cache stops"; "error" => %e);
            if st.failed.is_none() {
                inner.fail(st, e);
            }
        }
    }
}
