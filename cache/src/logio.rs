//! Cache-device I/O shared by the writeback thread and the cleaner (`writeback.rs`,
//! `clean.rs`): reading written segments back and committing the superblock.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::device::AlignedBuf;
use crate::error::{Error, Result};
use crate::format::{decode_copies, newest_header, SegmentHeader, Superblock, LINE};
use crate::state::{backing_table, Inner};

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

/// Reads segments `first..=last` but `skip` back from the cache device and checks them.
/// A segment's newest header is used unless recovery took an older one (`gens`: its
/// newest append failed its checks), so writeback sees the lines the index was built
/// from.
pub(crate) fn read_segments(
    inner: &Inner,
    first: u64,
    last: u64,
    skip: &[u64],
    gens: &BTreeMap<u64, u16>,
) -> Result<(Vec<AlignedBuf>, Vec<SegmentHeader>)> {
    let geo = &inner.geo;
    let ds = geo.data_start();
    let desc = inner.cache.describe();
    let mut bufs = Vec::new();
    let mut headers = Vec::new();
    for id in (first..=last).filter(|id| !skip.contains(id)) {
        let mut buf = AlignedBuf::new(geo.segment_size as usize);
        let off = geo.segment_offset(id);
        inner
            .cache
            .read_at(&mut buf, off)
            .map_err(|e| Error::io(&desc, off, e))?;
        let bad = |reason: String| Error::BadFormat {
            device: desc.clone(),
            reason: format!("segment {id} unreadable for writeback: {reason}"),
        };
        let h = match gens.get(&id) {
            Some(&gen) => decode_copies(&buf, geo)
                .into_iter()
                .flatten()
                .find(|(h, _)| h.id == id && h.uuid == inner.uuid && h.gen == gen),
            None => newest_header(&buf, geo, id, &inner.uuid),
        };
        let Some((h, _)) = h else {
            return Err(bad("no header of this segment".into()));
        };
        let n = h.entries.len();
        if crate::format::crc(&buf[ds..ds + n * LINE as usize]) != h.data_crc {
            return Err(bad("data checksum mismatch".into()));
        }
        headers.push(h);
        bufs.push(buf);
    }
    Ok((bufs, headers))
}
