//! Cache-device I/O shared by the writeback thread and the cleaner (`writeback.rs`,
//! `clean.rs`): reading written segments back and committing the superblock.

use std::collections::BTreeMap;
use std::sync::Arc;

use slog::{info, warn};

use crate::device::AlignedBuf;
use crate::error::{Error, Result};
use crate::format::{segment_header, SegmentHeader, Superblock, LINE};
use crate::index::unkey;
use crate::state::{backing_table, Inner, State};

/// Writes the superblock with `wb_id` (or the current one), then flushes the cache device.
pub(crate) fn commit(inner: &Inner, new_wb: Option<u64>) -> Result<()> {
    let (sb, off, seq, wb_crc) = {
        let mut st = inner.lock();
        st.sb_seq += 1;
        // What the segment after the new writeback point chains to: the flusher
        // recorded it when it wrote that point's segment (or recovery, when it walked
        // it).
        let wb_crc = match new_wb {
            Some(w) => st.chain.get(&w).copied(),
            None => st.wb_crc,
        };
        let sb = Superblock {
            geometry: inner.geo,
            uuid: inner.uuid,
            seq: st.sb_seq,
            last_writeback_id: new_wb.unwrap_or(st.wb_id),
            durable_id: st.durable_claim(),
            last_writeback_crc: wb_crc,
            backing: backing_table(&st),
        };
        (
            sb.encode(),
            Superblock::copy_offset(st.sb_seq),
            st.sb_seq,
            wb_crc,
        )
    };
    let desc = inner.cache.describe();
    let r = inner
        .cache
        .write_at(&sb, off)
        .and_then(|_| inner.cache.flush())
        .map_err(|e| Arc::new(Error::io(&desc, off, e)));
    let mut st = inner.lock();
    inner.io_cv.notify_all();
    match r {
        Ok(()) => {
            st.sb_committed = st.sb_committed.max(seq);
            st.cache_bytes_written += sb.len() as u64;
            if let Some(w) = new_wb.filter(|&w| w >= st.wb_id) {
                // The caller makes `w` the writeback point next; older crcs go.
                st.wb_crc = wb_crc;
                st.chain = st.chain.split_off(&w);
            }
            Ok(())
        }
        Err(e) => {
            st.sb_failed = Some((seq, e.clone()));
            Err(Error::Superblock(e))
        }
    }
}

/// Copies of segment `seg` found rotten while serving (docs/FORMAT.md, "Damage found
/// while serving"), as (line key, slot); `None`: every copy the index holds in it (its
/// header is unreadable). Each that is still its line's newest copy leaves the index: a
/// clean copy is simply dropped (the backing device holds its data), a dirty copy or a
/// discard record makes its sectors lost and its segment damaged. Returns whether
/// anything was lost (the checkpoints must then be retired).
pub(crate) fn lose_copies(st: &mut State, seg: u64, copies: Option<&[(u64, u16)]>) -> bool {
    let listed: Vec<(u64, u16)> = match copies {
        Some(c) => c.to_vec(),
        None => st
            .index
            .iter()
            .filter(|(_, l)| l.seg == seg)
            .map(|(k, l)| (k, l.slot))
            .collect(),
    };
    let mut lost = false;
    for (k, slot) in listed {
        let Some(l) = st.index.get(k).filter(|l| l.seg == seg && l.slot == slot) else {
            continue;
        };
        st.index.remove_if(k, l);
        if !st.damage.lose_copy(&mut st.index, seg, k, l) {
            continue;
        }
        if let Some(b) = st.backing[unkey(k).0 as usize].as_mut() {
            b.dirty = b.dirty.saturating_sub(1);
        }
        lost = true;
    }
    lost
}

/// Copies the index holds in segment `h.id` that its header `h` does not list: its
/// newest header copy rotted and an older append's header was read, which lacks the
/// lines added since. Their crcs went with that header, so they count as rotten (the
/// caller loses them, [`lose_copies`]); left in the index, they would point into a slot
/// released for reuse. Under the lock; the index is scanned only when the header lists
/// fewer live copies than the segment holds.
pub(crate) fn unlisted(st: &State, h: &SegmentHeader) -> Vec<(u64, u16)> {
    let key_at = |slot: usize| h.entries.get(slot).map(|e| e.line_key());
    let listed = (0..h.entries.len())
        .filter(|&s| {
            st.index
                .get(key_at(s).expect("listed"))
                .is_some_and(|l| l.seg == h.id && l.slot as usize == s)
        })
        .count();
    if listed as u32 >= st.index.seg_lines(h.id).live {
        return Vec::new();
    }
    st.index
        .iter()
        .filter(|&(k, l)| l.seg == h.id && key_at(l.slot as usize) != Some(k))
        .map(|(k, l)| (k, l.slot))
        .collect()
}

/// The copies (line key, slot) in slots `slots` of segment `h`, as [`lose_copies`]
/// takes them.
pub(crate) fn copies_at(h: &SegmentHeader, slots: &[usize]) -> Vec<(u64, u16)> {
    slots
        .iter()
        .map(|&s| (h.entries[s].line_key(), s as u16))
        .collect()
}

/// Rotten copies found by writeback or the cleaner (`e`, an [`Error::Rotten`] of
/// segment `seg`; `copies` as for [`lose_copies`]): the ones still live are lost (the
/// checkpoint thread records the loss, woken here). The cache does not fail.
pub(crate) fn found_rot(inner: &Inner, e: &Error, seg: u64, copies: Option<&[(u64, u16)]>) {
    let lost = {
        let mut st = inner.lock();
        st.rotten_found += copies.map_or(1, |c| c.len() as u64);
        let lost = lose_copies(&mut st, seg, copies);
        inner.io_cv.notify_all();
        inner.worker_cv.notify_all();
        lost
    };
    if lost {
        warn!(inner.log, "rotten line copies on the cache device: their data is lost and reads of it fail; the segment is kept as damage until a checkpoint records the loss";
              "error" => %e, "segment" => seg);
    } else {
        info!(inner.log, "rotten line copies on the cache device were no longer needed"; "error" => %e);
    }
}

/// [`found_rot`] for the copies `copies` (line key, slot) of segment `seg` that failed
/// their checks; returns the [`Error::Rotten`] it logged.
pub(crate) fn rotten_copies(inner: &Inner, seg: u64, copies: &[(u64, u16)]) -> Error {
    let e = Error::Rotten {
        device: inner.cache.describe(),
        segment: seg,
        slots: Some(copies.iter().map(|&(_, s)| s as usize).collect()),
    };
    found_rot(inner, &e, seg, Some(copies));
    e
}

/// Reads segment `seg`'s header back and records its line crcs for reads (docs/
/// DESIGN.md, "Line checks on reads"): the copy recovery took, else the newest. A
/// header that no longer reads is rot of every copy the index holds in the segment
/// ([`found_rot`]). Nothing is recorded when the slot was reused meanwhile (the read
/// is planned again and no longer finds the segment).
pub(crate) fn load_line_crcs(inner: &Inner, seg: u64) -> Result<()> {
    let gens = gens_of(&inner.lock(), seg);
    let r = read_for_moves(inner, seg, false, &gens);
    let mut st = inner.lock();
    if inner.slot_reused(&st, seg) {
        return Ok(());
    }
    match r {
        Ok((_, h, _)) => {
            st.line_crcs.record_header(&h);
            Ok(())
        }
        Err(e @ Error::Rotten { .. }) => {
            drop(st);
            found_rot(inner, &e, seg, None);
            Ok(())
        }
        Err(e) => Err(e),
    }
}

/// The append recovery took segment `seg` at, when not its newest (`recovered_gens`),
/// as the map [`read_for_moves`] takes.
pub(crate) fn gens_of(st: &State, seg: u64) -> BTreeMap<u64, u16> {
    st.recovered_gens
        .get(&seg)
        .map(|&g| (seg, g))
        .into_iter()
        .collect()
}

/// Segments read back for writeback: per segment its bytes, its header, and the slots
/// whose line failed its check (ascending; empty when all are sound).
pub(crate) type ReadBack = (Vec<AlignedBuf>, Vec<SegmentHeader>, Vec<Vec<usize>>);

/// Reads segments `first..=last` but `skip` back from the cache device and checks each
/// line ([`rotten_slots`]): a rotten line is reported, not an error, since only the
/// copies writeback takes matter. A segment's newest header is used unless recovery
/// took an older one (`gens`: its newest append failed its checks), so writeback sees
/// the lines the index was built from; no header of it is [`Error::Rotten`].
pub(crate) fn read_segments(
    inner: &Inner,
    first: u64,
    last: u64,
    skip: &[u64],
    gens: &BTreeMap<u64, u16>,
) -> Result<ReadBack> {
    let geo = &inner.geo;
    let mut bufs = Vec::new();
    let mut headers = Vec::new();
    let mut rots = Vec::new();
    for id in (first..=last).filter(|id| !skip.contains(id)) {
        let mut buf = AlignedBuf::new(geo.segment_size as usize);
        read_part(inner, &mut buf, id, 0, geo.segment_size as usize)?;
        let h = pick_header(inner, &buf, id, gens)?;
        let all: Vec<usize> = (0..h.entries.len()).collect();
        rots.push(rotten_slots(inner, &buf, &h, &all));
        headers.push(h);
        bufs.push(buf);
    }
    Ok((bufs, headers, rots))
}

/// Reads segment `id` for the cleaner: the whole slot when `whole`, else only its
/// header copies (its lines are read later, by [`read_lines`]); picks its header as
/// [`read_segments`] does. Returns the buffer (segment-sized), the header and the
/// bytes read.
pub(crate) fn read_for_moves(
    inner: &Inner,
    id: u64,
    whole: bool,
    gens: &BTreeMap<u64, u16>,
) -> Result<(AlignedBuf, SegmentHeader, u64)> {
    let geo = &inner.geo;
    let mut buf = AlignedBuf::new(geo.segment_size as usize);
    let len = if whole {
        geo.segment_size as usize
    } else {
        geo.data_start()
    };
    read_part(inner, &mut buf, id, 0, len)?;
    let h = pick_header(inner, &buf, id, gens)?;
    Ok((buf, h, len as u64))
}

/// Live lines further apart than this (in lines) are read by separate requests, closer
/// ones by one request spanning the lines between them.
pub(crate) const READ_GAP: usize = 16;

/// Reads the lines `slots` (ascending) of segment `h` into `buf` (from
/// [`read_for_moves`] without `whole`), in runs of slots at most [`READ_GAP`] apart,
/// and checks them ([`check_lines`]); all its lines when one of them has no line crc.
/// Only the lines in `slots` (and those between close ones) are valid in `buf`
/// afterwards. Returns the bytes read.
pub(crate) fn read_lines(
    inner: &Inner,
    buf: &mut AlignedBuf,
    h: &SegmentHeader,
    slots: &[usize],
) -> Result<u64> {
    let (ds, line) = (inner.geo.data_start(), LINE as usize);
    let mut bytes = 0;
    if !line_crcs(h, slots) {
        read_part(inner, buf, h.id, ds, ds + h.entries.len() * line)?;
        bytes = (h.entries.len() * line) as u64;
    } else {
        let mut i = 0;
        while i < slots.len() {
            let mut j = i;
            while j + 1 < slots.len() && slots[j + 1] - slots[j] <= READ_GAP {
                j += 1;
            }
            let (from, to) = (ds + slots[i] * line, ds + (slots[j] + 1) * line);
            read_part(inner, buf, h.id, from, to)?;
            bytes += (to - from) as u64;
            i = j + 1;
        }
    }
    check_lines(inner, buf, h, slots)?;
    Ok(bytes)
}

/// Checks the lines `slots` of segment `h` in `buf` ([`rotten_slots`]): the ones that
/// fail are [`Error::Rotten`].
pub(crate) fn check_lines(
    inner: &Inner,
    buf: &[u8],
    h: &SegmentHeader,
    slots: &[usize],
) -> Result<()> {
    let bad = rotten_slots(inner, buf, h, slots);
    if bad.is_empty() {
        return Ok(());
    }
    Err(Error::Rotten {
        device: inner.cache.describe(),
        segment: h.id,
        slots: Some(bad),
    })
}

/// Which of the lines `slots` (ascending) of segment `h` in `buf` fail their check:
/// each against its crc in the header when every one of them has one (a discard
/// record never fails: its bytes carry nothing), else the whole
/// segment against its data crc (headers from before line checksums; `buf` must hold
/// all its lines then), which when it fails fails them all.
pub(crate) fn rotten_slots(
    inner: &Inner,
    buf: &[u8],
    h: &SegmentHeader,
    slots: &[usize],
) -> Vec<usize> {
    let (ds, line) = (inner.geo.data_start(), LINE as usize);
    if !line_crcs(h, slots) {
        let n = h.entries.len();
        let sound = crate::format::crc(&buf[ds..ds + n * line]) == h.data_crc;
        return if sound { Vec::new() } else { slots.to_vec() };
    }
    // A discard record's bytes carry nothing (it reads as zeros whatever they hold,
    // and its header entry, under the header crc, is the record): their rot loses
    // nothing.
    slots
        .iter()
        .copied()
        .filter(|&s| {
            let at = ds + s * line;
            !h.entries[s].is_tombstone()
                && Some(crate::format::crc(&buf[at..at + line])) != h.entries[s].crc
        })
        .collect()
}

/// True when the header of `h` records the crc of every line in `slots` (false for
/// headers written before line checksums).
fn line_crcs(h: &SegmentHeader, slots: &[usize]) -> bool {
    slots.iter().all(|&s| h.entries[s].crc.is_some())
}

/// Reads bytes `from..to` of segment `id`'s slot into the same range of `buf`.
fn read_part(inner: &Inner, buf: &mut [u8], id: u64, from: usize, to: usize) -> Result<()> {
    let off = inner.geo.segment_offset(id) + from as u64;
    inner
        .cache
        .read_at(&mut buf[from..to], off)
        .map_err(|e| Error::io(&inner.cache.describe(), off, e))
}

/// Segment `id`'s header among the copies at the start of `buf`: the newest, or the
/// append recovery took (`gens`).
fn pick_header(
    inner: &Inner,
    buf: &[u8],
    id: u64,
    gens: &BTreeMap<u64, u16>,
) -> Result<SegmentHeader> {
    segment_header(buf, &inner.geo, id, &inner.uuid, gens.get(&id).copied()).ok_or_else(|| {
        Error::Rotten {
            device: inner.cache.describe(),
            segment: id,
            slots: None,
        }
    })
}
