//! Scrub (`lc scrub`, [`crate::Cache::scrub`]): reads every line the index holds on the
//! cache device and checks it against its line crc, so that media damage of data nobody
//! reads is found while the user may still hold another copy of it, not when writeback
//! finally needs it (docs/DESIGN.md, "Scrub"). What it finds is dealt with as any rot
//! found while serving (`logio::found_rot`): a dirty copy's sectors are lost, a clean
//! copy is dropped, the checkpoints are retired.

use crate::error::{Error, Result};
use crate::logio::{
    copies_at, found_rot, gens_of, read_for_moves, read_lines, rotten_copies, unlisted,
};
use crate::state::Inner;

/// Progress of a scrub: segments of the log holding indexed lines, checked so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ScrubProgress {
    /// Segments to check (listed when the scrub started).
    pub total: u64,
    /// Segments checked.
    pub done: u64,
}

/// What a scrub read and found.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ScrubReport {
    /// Segments checked.
    pub segments: u64,
    /// Line copies read and checked.
    pub lines: u64,
    /// Bytes read from the cache device.
    pub bytes_read: u64,
    /// Copies found rotten (each lost, or dropped when clean), and copies of segments
    /// whose header no longer reads.
    pub rotten: u64,
}

/// Scrubs every segment on the cache device that holds lines the index points at, in
/// log order, calling `progress` after each. Segments written meanwhile are not added;
/// a segment whose slot is reused while it is read is skipped (its lines all moved or
/// were written back). An I/O error of the cache device ends the scrub with it.
pub(crate) fn scrub(inner: &Inner, progress: &mut dyn FnMut(ScrubProgress)) -> Result<ScrubReport> {
    let segs: Vec<u64> = {
        let st = inner.lock();
        let open = st.open.as_ref().map(|o| o.id);
        st.index
            .segments()
            .filter(|&(id, s)| s.live > 0 && Some(id) != open && !st.ram.contains_key(&id))
            .map(|(id, _)| id)
            .collect()
    };
    let mut report = ScrubReport::default();
    let total = segs.len() as u64;
    for (i, &id) in segs.iter().enumerate() {
        scrub_segment(inner, id, &mut report)?;
        report.segments += 1;
        progress(ScrubProgress {
            total,
            done: i as u64 + 1,
        });
    }
    Ok(report)
}

/// Checks the live copies of segment `id` (its header first, then those lines alone).
fn scrub_segment(inner: &Inner, id: u64, report: &mut ScrubReport) -> Result<()> {
    let gens = {
        let st = inner.lock();
        if inner.slot_reused(&st, id) || st.index.seg_lines(id).live == 0 {
            return Ok(());
        }
        gens_of(&st, id)
    };
    let read = read_for_moves(inner, id, false, &gens);
    let (mut buf, h, n) = match read {
        Ok(r) => r,
        Err(e @ Error::Rotten { .. }) => {
            let st = inner.lock();
            if !inner.slot_reused(&st, id) {
                report.rotten += st.index.seg_lines(id).live as u64;
                drop(st);
                found_rot(inner, &e, id, None);
            }
            return Ok(());
        }
        Err(e) => return Err(e),
    };
    report.bytes_read += n;
    let (slots, missing) = {
        let st = inner.lock();
        if inner.slot_reused(&st, id) {
            return Ok(());
        }
        let slots: Vec<usize> = (0..h.entries.len())
            .filter(|&s| crate::clean::live_at(&st, &h, s).is_some())
            .collect();
        (slots, unlisted(&st, &h))
    };
    if !missing.is_empty() {
        report.rotten += missing.len() as u64;
        rotten_copies(inner, id, &missing);
    }
    if slots.is_empty() {
        return Ok(());
    }
    report.lines += slots.len() as u64;
    match read_lines(inner, &mut buf, &h, &slots) {
        Ok(n) => report.bytes_read += n,
        Err(Error::Rotten {
            slots: Some(bad), ..
        }) => {
            if inner.slot_reused(&inner.lock(), id) {
                return Ok(());
            }
            let copies = copies_at(&h, &bad);
            report.rotten += copies.len() as u64;
            rotten_copies(inner, id, &copies);
        }
        Err(e) => return Err(e),
    }
    Ok(())
}
