//! Read-ahead for recovery's log walk (`recovery.rs`): a thread reads the slots the
//! walk will ask for, in order and whole, while the walk (or the checkpoint load before
//! it) runs, so that the I/O of the segments after a checkpoint overlaps the loading of
//! the checkpoint and the checks of the segments before them.
//!
//! It only reads: the walk makes every decision, on the same bytes and the same
//! checksums it would have read and computed itself. For each slot it hands over the
//! header copies and the crc32c of every prefix of the slot's lines (`prefix[n]` is the
//! crc of lines `0..n`), so the walk checks a header's `data_crc` against
//! `prefix[nr_lines]`. It stops after the first slot holding no segment of this log with
//! the id it expects (the end of the log, damage, or a reused slot: the walk decides),
//! and then reads the headers of the slots after that one that the walk's durability
//! proof would scan (`2 * SEAL_AHEAD` of them, FORMAT.md "Recovery" step 3) with a few
//! threads, and hands over their claims.
//!
//! A slot or header it could not read is left to the walk, which reads it itself and
//! reports the error as before; so is anything the walk asks for that the read-ahead
//! does not hold (the walk restarted elsewhere, or it stopped early).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;
use std::thread::Scope;

use crate::device::{AlignedBuf, BlockDevice};
use crate::error::{Error, Result};
use crate::format::{decode_copies, newest_header, Superblock, LINE, SEAL_AHEAD};

/// Slots read ahead and not yet taken, at most (their header bytes and crcs: about
/// 9 KiB each with 1 MiB segments).
const DEPTH: usize = 1024;
/// Bytes of consecutive slots read at once.
const READ: usize = 8 << 20;
/// Threads reading the headers of the claims window.
const CLAIM_THREADS: u64 = 4;

/// One slot as the walk reads it.
pub(crate) struct Slot {
    /// The slot's first `data_start` bytes: its header copies.
    pub head: Vec<u8>,
    /// crc32c of lines `0..n` of the slot, for `n = 0..prefix.len()`.
    prefix: Vec<u32>,
}

impl Slot {
    /// Reads the header copies of the slot of `id` (its lines are read only if
    /// [`Slot::data_crcs`] needs them).
    pub fn read_head(dev: &dyn BlockDevice, sb: &Superblock, id: u64) -> Result<Slot> {
        let geo = &sb.geometry;
        let mut buf = AlignedBuf::new(geo.data_start());
        let off = geo.segment_offset(id);
        dev.read_at(&mut buf, off)
            .map_err(|e| Error::io(&dev.describe(), off, e))?;
        Ok(Slot {
            head: buf.to_vec(),
            prefix: vec![0],
        })
    }

    /// The crc of every prefix of the slot's first `lines` lines (at least; index by a
    /// header's line count), reading them if the read-ahead did not.
    pub fn data_crcs(
        &mut self,
        dev: &dyn BlockDevice,
        sb: &Superblock,
        id: u64,
        lines: usize,
    ) -> Result<&[u32]> {
        if self.prefix.len() <= lines {
            let geo = &sb.geometry;
            let ds = geo.data_start();
            let mut buf = AlignedBuf::new(lines * LINE as usize);
            let off = geo.segment_offset(id) + ds as u64;
            dev.read_at(&mut buf, off)
                .map_err(|e| Error::io(&dev.describe(), off, e))?;
            self.prefix = prefix_crcs(&buf);
        }
        Ok(&self.prefix)
    }
}

/// `out[n]` = crc32c of the first `n` lines of `data`.
fn prefix_crcs(data: &[u8]) -> Vec<u32> {
    let mut out = Vec::with_capacity(data.len() / LINE as usize + 1);
    let mut crc = 0u32;
    out.push(crc);
    for line in data.chunks_exact(LINE as usize) {
        crc = crc32c::crc32c_append(crc, line);
        out.push(crc);
    }
    out
}

enum Ahead {
    Slot {
        id: u64,
        slot: Slot,
        last: bool,
    },
    /// The durability claim of each slot from `first` on (0: no header of that id;
    /// `None`: the header could not be read).
    Claims {
        first: u64,
        claims: Vec<Option<u64>>,
    },
}

/// The read-ahead of a walk starting at `from` (see the module doc).
pub(crate) struct ReadAhead {
    pub from: u64,
    rx: Option<Receiver<Ahead>>,
    stop: Arc<AtomicBool>,
    /// The id the next slot handed over has.
    next: u64,
    /// The slot the read-ahead stopped at, once taken.
    ended_at: Option<u64>,
    window: Option<(u64, Vec<Option<u64>>)>,
}

impl Drop for ReadAhead {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

impl ReadAhead {
    /// Starts reading the slots of ids `from ..= window_end` in a thread of `scope`.
    pub fn start<'scope, 'env>(
        scope: &'scope Scope<'scope, 'env>,
        dev: &'env dyn BlockDevice,
        sb: &'env Superblock,
        from: u64,
        window_end: u64,
    ) -> ReadAhead {
        let (tx, rx) = sync_channel(DEPTH);
        let stop = Arc::new(AtomicBool::new(false));
        let halt = stop.clone();
        scope.spawn(move || {
            let geo = &sb.geometry;
            let ds = geo.data_start();
            let seg = geo.segment_size as usize;
            let per_read = (READ / seg).max(1) as u64;
            let mut buf = AlignedBuf::new(per_read as usize * seg);
            let mut id = from;
            'read: loop {
                if id > window_end || halt.load(Ordering::Relaxed) {
                    return;
                }
                // Consecutive slots, up to the ring's end.
                let slot0 = (id - 1) % geo.nr_segments;
                let n = per_read
                    .min(geo.nr_segments - slot0)
                    .min(window_end - id + 1);
                let len = n as usize * seg;
                let whole = dev.read_at(&mut buf[..len], geo.segment_offset(id)).is_ok();
                for x in id..id + n {
                    let at = (x - id) as usize * seg;
                    let slot = if whole {
                        Slot {
                            head: buf[at..at + ds].to_vec(),
                            prefix: prefix_crcs(&buf[at + ds..at + seg]),
                        }
                    } else {
                        // Perhaps only some lines are unreadable: the walk reads what it
                        // needs of them.
                        match Slot::read_head(dev, sb, x) {
                            Ok(s) => s,
                            Err(_) => return,
                        }
                    };
                    let ours = decode_copies(&slot.head, geo)
                        .into_iter()
                        .flatten()
                        .any(|(h, _)| h.uuid == sb.uuid && h.id == x && h.lap == geo.lap(x));
                    let last = !ours;
                    if tx.send(Ahead::Slot { id: x, slot, last }).is_err() {
                        return;
                    }
                    if last {
                        id = x;
                        break 'read;
                    }
                }
                id += n;
            }
            // The headers the walk scans for a durability claim when the log ends (or is
            // damaged) at `id`.
            let first = id + 1;
            let end = window_end.min(id + 2 * SEAL_AHEAD);
            if first > end {
                return;
            }
            let n = end - first + 1;
            let parts: Vec<Vec<Option<u64>>> = std::thread::scope(|s| {
                let workers: Vec<_> = (0..CLAIM_THREADS.min(n))
                    .map(|t| {
                        let halt = &halt;
                        s.spawn(move || {
                            let mut buf = AlignedBuf::new(ds);
                            let mut out = Vec::new();
                            let mut x = first + t;
                            while x <= end && !halt.load(Ordering::Relaxed) {
                                out.push(dev.read_at(&mut buf, geo.segment_offset(x)).ok().map(
                                    |()| {
                                        newest_header(&buf, geo, x, &sb.uuid)
                                            .map_or(0, |(h, _)| h.durable)
                                    },
                                ));
                                x += CLAIM_THREADS;
                            }
                            out
                        })
                    })
                    .collect();
                workers
                    .into_iter()
                    .map(|w| w.join().expect("claims reader thread"))
                    .collect()
            });
            if halt.load(Ordering::Relaxed) {
                return;
            }
            let claims = (0..n as usize)
                .map(|i| parts[i % parts.len()][i / parts.len()])
                .collect();
            let _ = tx.send(Ahead::Claims { first, claims });
        });
        ReadAhead {
            from,
            rx: Some(rx),
            stop,
            next: from,
            ended_at: None,
            window: None,
        }
    }

    /// The slot of `id` if it was read ahead (the walk asks in order).
    pub fn take(&mut self, id: u64) -> Option<Slot> {
        if id < self.next {
            return None;
        }
        while let Some(rx) = &self.rx {
            match rx.recv() {
                Ok(Ahead::Slot { id: x, slot, last }) => {
                    self.next = x + 1;
                    if last {
                        self.ended_at = Some(x);
                    }
                    if x == id {
                        return Some(slot);
                    }
                    if last {
                        return None;
                    }
                }
                Ok(Ahead::Claims { first, claims }) => {
                    self.window = Some((first, claims));
                    return None;
                }
                Err(_) => self.rx = None,
            }
        }
        None
    }

    /// The durability claim of the header in the slot of `id` (0: no header of that
    /// id), if the read-ahead read it: `None` means the caller reads it.
    pub fn claim(&mut self, id: u64) -> Option<u64> {
        loop {
            if let Some((first, claims)) = &self.window {
                return id
                    .checked_sub(*first)
                    .and_then(|i| claims.get(i as usize).copied().flatten());
            }
            // The claims come right after the last slot: wait for them only once the
            // walk took that slot and asks for one after it.
            let rx = self.rx.as_ref()?;
            if self.ended_at.is_none_or(|e| id <= e) {
                return None;
            }
            match rx.recv() {
                Ok(Ahead::Claims { first, claims }) => self.window = Some((first, claims)),
                Ok(Ahead::Slot { .. }) | Err(_) => {
                    self.rx = None;
                    return None;
                }
            }
        }
    }
}
