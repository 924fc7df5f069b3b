//! Log damage found by recovery or while serving, and what it means for reads, writes
//! and writeback.
//!
//! A segment in the middle of the log that fails its checks although a later segment
//! proves it was durable (see `docs/FORMAT.md`, "Recovery") is *damaged*: the data of
//! its lines that fail their crcs is gone. Recovery replays the intact segments (and
//! the intact lines of a damaged one) after it, so every line with a newer copy reads
//! that copy; the lines whose newest durable copy was rotten are *lost* and reads of
//! them fail (MEDIUM ERROR in the daemon) instead of returning the older copy or the
//! backing device's older data. Writeback and the cleaner record the same when a copy
//! they read back fails its crc ([`Damage::lose`], FORMAT.md "Damage found while
//! serving").
//!
//! - When the damaged segment's header is intact, its entries say exactly which
//!   sectors are lost ([`Damage::lost`]).
//! - When the header itself is unreadable, nobody knows which lines it held: every line
//!   without a copy in a later segment is refused ([`Damage::unknown_upto`]), and so is
//!   a partial-line write to such a line (it would merge unknown older data).
//!
//! A write covering lost sectors makes them good again; once nothing is lost the damage
//! is resolved by itself. Until then the evidence is kept: writeback stops before the
//! first damaged segment, so its slot and every later one stay as they are, and a
//! restart finds and reports the same damage. `Cache::accept_loss` is the operator's
//! way out: it lists what was lost and lets the older data be read again.

use std::collections::{BTreeMap, BTreeSet};

use crate::format::{Entry, FULL_LINE, SECTORS_PER_LINE};
use crate::index::{unkey, Index, Loc};

/// What recovery found damaged and what of it is still lost.
#[derive(Clone, Debug, Default)]
pub(crate) struct Damage {
    /// Damaged segment ids not yet passed by writeback.
    pub segments: BTreeSet<u64>,
    /// Line key -> sector bits whose newest durable copy is lost.
    pub lost: BTreeMap<u64, u8>,
    /// Newest damaged segment whose header was unreadable (0: none): a line is
    /// readable only from a copy in a later segment.
    pub unknown_upto: u64,
}

/// A loss, as `Cache::stats` and `Cache::accept_loss` report it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DamageReport {
    /// Damaged segment ids (kept as evidence until writeback passes them).
    pub segments: Vec<u64>,
    /// Lost 4 KiB lines per backing device id.
    pub lost_lines: Vec<(u8, u64)>,
    /// Lost ranges: (backing device id, first 512-byte sector, sectors), merged.
    pub lost_ranges: Vec<(u8, u64, u64)>,
    /// A damaged segment's header was unreadable: every line with no copy written
    /// after segment `unknown_upto` is refused (0: no such segment).
    pub unknown_upto: u64,
}

impl Damage {
    /// True while reads are refused somewhere (lost sectors or unknown lines).
    pub fn unresolved(&self) -> bool {
        !self.lost.is_empty() || self.unknown_upto > 0
    }

    /// Recovery: segment `id` is damaged; `entries` when its header could be read.
    pub fn add_segment(&mut self, id: u64, entries: Option<&[Entry]>) {
        self.segments.insert(id);
        match entries {
            Some(es) => es.iter().for_each(|e| self.lose_entry(id, e)),
            None => self.unknown_upto = self.unknown_upto.max(id),
        }
    }

    /// Recovery: the copy `e` of damaged segment `id` failed its check. A clean copy
    /// holds what the backing device holds: nothing is lost with it.
    pub fn lose_entry(&mut self, id: u64, e: &Entry) {
        self.segments.insert(id);
        if !e.is_clean() {
            self.lose(
                id,
                e.line_key(),
                if e.is_tombstone() { FULL_LINE } else { e.dirty },
            );
        }
    }

    /// While serving: the newest copy of line `k`, in segment `id`, failed its check;
    /// its sectors `bits` are lost.
    pub fn lose(&mut self, id: u64, k: u64, bits: u8) {
        self.segments.insert(id);
        *self.lost.entry(k).or_insert(0) |= bits;
    }

    /// Copy `l` of line `k`, in segment `seg`, found rotten while it is the line's
    /// newest: it leaves `index`, and a dirty copy's sectors (all 8 of a discard
    /// record's) are lost. Returns whether anything was lost (a clean copy is only
    /// dropped: the backing device holds its data).
    pub fn lose_copy(&mut self, index: &mut Index, seg: u64, k: u64, l: Loc) -> bool {
        index.remove_if(k, l);
        if l.clean {
            return false;
        }
        self.lose(seg, k, if l.tomb { FULL_LINE } else { l.dirty });
        true
    }

    /// A newer copy of line `k` holding sectors `bits` (a discard record: all of them).
    pub fn supersede(&mut self, k: u64, bits: u8) {
        if let Some(m) = self.lost.get_mut(&k) {
            *m &= !bits;
            if *m == 0 {
                self.lost.remove(&k);
            }
        }
    }

    /// True when sectors `want` of line `k`, whose newest copy is `loc`, can be read.
    pub fn readable(&self, k: u64, want: u8, loc: Option<Loc>) -> bool {
        if self.lost.get(&k).is_some_and(|m| m & want != 0) {
            return false;
        }
        self.unknown_upto == 0 || loc.is_some_and(|l| l.seg > self.unknown_upto)
    }

    /// For a write of sectors `mask` of line `k` whose newest copy is `loc`: the sectors
    /// of `loc` the new copy may carry over (all of a discard record's, none that are
    /// lost), or `None` when
    /// the write must be refused (a partial write over a line of unknown content).
    pub fn mergeable(&self, k: u64, loc: Option<Loc>, mask: u8) -> Option<u8> {
        if self.unknown_upto > 0
            && mask != FULL_LINE
            && loc.is_none_or(|l| l.seg <= self.unknown_upto)
        {
            return None;
        }
        let lost = self.lost.get(&k).copied().unwrap_or(0);
        let held = loc.map_or(0, |l| if l.tomb { FULL_LINE } else { l.dirty });
        Some(held & !lost)
    }

    /// Highest segment id writeback may pass: the evidence before the first damaged
    /// segment stays while anything is lost.
    pub fn writeback_limit(&self) -> u64 {
        match self.segments.first() {
            Some(&first) if self.unresolved() => first - 1,
            _ => u64::MAX,
        }
    }

    /// Forgets damaged segment ids at or below the writeback point.
    pub fn passed(&mut self, wb_id: u64) {
        self.segments.retain(|&s| s > wb_id);
    }

    /// The report of what is damaged and lost.
    pub fn report(&self) -> DamageReport {
        let mut per_dev: BTreeMap<u8, u64> = BTreeMap::new();
        let mut ranges: Vec<(u8, u64, u64)> = Vec::new();
        for (&k, &bits) in &self.lost {
            let (dev, line) = unkey(k);
            *per_dev.entry(dev).or_insert(0) += 1;
            for s in 0..SECTORS_PER_LINE {
                if bits & (1 << s) == 0 {
                    continue;
                }
                let sector = line * SECTORS_PER_LINE + s;
                match ranges.last_mut() {
                    Some((d, first, n)) if *d == dev && *first + *n == sector => *n += 1,
                    _ => ranges.push((dev, sector, 1)),
                }
            }
        }
        DamageReport {
            segments: self.segments.iter().copied().collect(),
            lost_lines: per_dev.into_iter().collect(),
            lost_ranges: ranges,
            unknown_upto: self.unknown_upto,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::key;

    fn entry(dev: u8, line: u64, dirty: u8) -> Entry {
        Entry {
            sector: line * SECTORS_PER_LINE,
            dev,
            dirty,
            flags: 0,
            crc: None,
        }
    }

    fn loc(seg: u64, dirty: u8) -> Option<Loc> {
        Some(Loc {
            seg,
            slot: 0,
            dirty,
            tomb: false,
            clean: false,
        })
    }

    #[test]
    fn lost_sectors_are_refused_until_rewritten() {
        let mut d = Damage::default();
        d.add_segment(5, Some(&[entry(0, 3, 0b0000_1111), entry(1, 3, FULL_LINE)]));
        let k = key(0, 3);
        assert!(d.unresolved());
        assert!(!d.readable(k, 0b0000_0001, loc(4, FULL_LINE)));
        assert!(d.readable(k, 0b1111_0000, loc(4, FULL_LINE)));
        // A partial write keeps the older copy's good sectors only.
        assert_eq!(d.mergeable(k, loc(4, FULL_LINE), 0b1), Some(0b1111_0000));
        d.supersede(k, 0b0000_0011);
        assert!(!d.readable(k, 0b0000_0100, loc(9, 0b1111_0011)));
        d.supersede(k, 0b0000_1100);
        assert!(d.readable(k, FULL_LINE, loc(9, FULL_LINE)));
        assert_eq!(d.writeback_limit(), 4);
        d.supersede(key(1, 3), FULL_LINE);
        assert!(!d.unresolved());
        assert_eq!(d.writeback_limit(), u64::MAX);
    }

    #[test]
    fn unknown_segment_refuses_lines_without_a_later_copy() {
        let mut d = Damage::default();
        d.add_segment(7, None);
        let k = key(0, 1);
        assert!(!d.readable(k, 1, None));
        assert!(!d.readable(k, 1, loc(7, FULL_LINE)));
        assert!(d.readable(k, 1, loc(8, 1)));
        assert_eq!(d.mergeable(k, loc(3, FULL_LINE), 1), None);
        assert_eq!(
            d.mergeable(k, loc(3, FULL_LINE), FULL_LINE),
            Some(FULL_LINE)
        );
        assert_eq!(d.mergeable(k, loc(8, 0b10), 1), Some(0b10));
    }

    #[test]
    fn report_merges_adjacent_sectors() {
        let mut d = Damage::default();
        d.add_segment(
            2,
            Some(&[entry(0, 0, 0b1100_0000), entry(0, 1, 0b0000_0011)]),
        );
        let r = d.report();
        assert_eq!(r.lost_lines, vec![(0, 2)]);
        assert_eq!(r.lost_ranges, vec![(0, 6, 4)]);
        assert_eq!(r.segments, vec![2]);
    }
}
