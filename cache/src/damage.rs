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
//! is resolved by itself. Until the loss is recorded the evidence is kept: writeback
//! stops before the first damaged segment, so its slot and every later one stay as
//! they are, and a restart finds and reports the same damage. Format 2 records the lost
//! sectors in checkpoints (*loss records*, FORMAT.md "Loss records"): once two
//! checkpoints in a row hold the current lost set, the evidence is no longer needed and
//! writeback passes the damaged segments, so damage no longer stops the log. Format 1
//! (no checkpoints), or damage whose lines are unknown (an unreadable header found by
//! recovery), keeps the evidence until nothing is lost. `Cache::accept_loss` is the
//! operator's way out: it lists what was lost and lets the older data be read again.

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
    /// Segments holding a copy that healed lost sectors: the evidence is kept until the
    /// heal is durable (and, with loss records, recorded).
    pub healing: BTreeSet<u64>,
    /// Heals not yet covered by a loss record: (segment, line key, sectors healed). A
    /// record written before the segment is durable lists them as lost (a crash may
    /// take the heal), to be healed again by the segment's replay.
    pub heals: Vec<(u64, u64, u8)>,
    /// Format 2: the lost set is recorded in checkpoints, so the evidence can go.
    pub records: bool,
    /// Changes to the lost set (a loss, a heal, an acceptance) since open.
    pub changes: u64,
    /// `changes` as of the snapshot of the newest durable checkpoint, and how many
    /// durable checkpoints in a row recorded that value.
    pub recorded: (u64, u8),
    /// The newest durable checkpoint holds loss records (a nonempty lost set).
    pub on_record: bool,
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
    /// The lost sectors (or their end: healed, accepted) are recorded in the checkpoints
    /// (format 2): the damaged segments no longer hold the log back, and a restart knows
    /// the loss without them.
    pub recorded: bool,
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
            None => {
                self.unknown_upto = self.unknown_upto.max(id);
                self.changes += 1;
            }
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
        let m = self.lost.entry(k).or_insert(0);
        if *m | bits != *m {
            *m |= bits;
            self.changes += 1;
        }
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

    /// A newer copy of line `k` holding sectors `bits` (a discard record: all of them),
    /// in segment `seg`. A heal of lost sectors changes the lost set; with loss records,
    /// `seg` is then kept like a damaged segment until the change is recorded (a
    /// recovery from the older record that did not walk `seg` would find the sectors
    /// lost again).
    pub fn supersede(&mut self, k: u64, bits: u8, seg: u64) {
        if let Some(m) = self.lost.get_mut(&k) {
            if *m & bits == 0 {
                return;
            }
            if self.records {
                self.heals.push((seg, k, *m & bits));
            }
            *m &= !bits;
            if *m == 0 {
                self.lost.remove(&k);
            }
            self.changes += 1;
            self.healing.insert(seg);
        }
    }

    /// The operator accepted the loss: nothing is refused any more.
    pub fn accept(&mut self) {
        if self.unresolved() {
            self.lost.clear();
            self.unknown_upto = 0;
            self.changes += 1;
        }
    }

    /// Loss records loaded from checkpoint (recovery): the lost set as of its snapshot,
    /// before any segment after it is replayed. Counts as recorded once.
    pub fn load_record(&mut self, lost: &[(u64, u8)]) {
        for &(k, bits) in lost {
            *self.lost.entry(k).or_insert(0) |= bits;
        }
        self.on_record = !lost.is_empty();
        self.recorded = (self.changes, 1);
    }

    /// True while the lost set (or an unrecorded change to it) needs a checkpoint
    /// that records it: until then the evidence stays (see [`Self::writeback_limit`]).
    /// `flushed`: the last durable segment (a record that lists a heal as lost is
    /// written again once the heal is durable).
    pub fn needs_record(&self, flushed: u64) -> bool {
        self.records
            && ((self.recorded != (self.changes, 2)
                && (self.unresolved() || self.on_record || !self.heals.is_empty()))
                || self.heals.iter().any(|&(seg, _, _)| seg <= flushed))
    }

    /// The loss records of a checkpoint whose segments up to `durable` are durable: the
    /// lost set, and the sectors healed by copies after `durable` (they are healed
    /// again when recovery replays them, and lost when a crash took them).
    pub fn record(&self, durable: u64) -> Vec<(u64, u8)> {
        let mut r = self.lost.clone();
        for &(seg, k, bits) in &self.heals {
            if seg > durable {
                *r.entry(k).or_insert(0) |= bits;
            }
        }
        r.into_iter().collect()
    }

    /// A durable checkpoint whose snapshot held the lost set as of `changes` (the
    /// value then) and whose segments up to `durable` are durable, `nonempty` when it
    /// held any loss record.
    pub fn record_written(&mut self, changes: u64, durable: u64, nonempty: bool) {
        self.heals.retain(|&(seg, _, _)| seg > durable);
        self.recorded = if self.recorded.0 == changes {
            (changes, self.recorded.1.saturating_add(1).min(2))
        } else {
            (changes, 1)
        };
        self.on_record = nonempty;
    }

    /// Segments up to `flushed` are durable: heals in them need no record unless the
    /// newest one lists them as lost.
    pub fn heals_durable(&mut self, flushed: u64) {
        if !self.on_record {
            self.heals.retain(|&(seg, _, _)| seg > flushed);
        }
    }

    /// The checkpoints were retired while nothing is lost: no record remains.
    pub fn records_retired(&mut self) {
        self.on_record = false;
        self.recorded = (self.changes, 2);
    }

    /// True when a new copy of line `k` holding sectors `mask` would leave lost sectors
    /// of it whose loss is not recorded yet (loss records only).
    pub fn unrecorded_loss(&self, k: u64, mask: u8) -> bool {
        self.records
            && self.recorded.0 != self.changes
            && self.lost.get(&k).is_some_and(|&m| m & !mask != 0)
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

    /// Highest segment id writeback may pass, `flushed` the last durable segment: the
    /// evidence before the first damaged (or healing) segment stays while anything is
    /// lost, or was healed by a copy, and that is not recorded (without loss records:
    /// while anything is lost, or a copy that healed lost sectors is not durable: a
    /// crash would take the heal, and the evidence must still say the sectors are
    /// lost).
    pub fn writeback_limit(&self, flushed: u64) -> u64 {
        let hold = if self.records {
            self.unknown_upto > 0 || self.needs_record(flushed)
        } else {
            self.unresolved() || self.healing.last().is_some_and(|&h| h > flushed)
        };
        let first = match (self.segments.first(), self.healing.first()) {
            (Some(&a), Some(&b)) => Some(a.min(b)),
            (a, b) => a.or(b).copied(),
        };
        let limit = match first {
            Some(first) if hold => first - 1,
            _ => u64::MAX,
        };
        // A heal a record lists as lost is replayed by recovery after the record: its
        // segment stays until a record no longer lists it.
        let heal = self.heals.iter().map(|&(seg, _, _)| seg - 1).min();
        limit.min(heal.unwrap_or(u64::MAX))
    }

    /// Forgets damaged (and healing) segment ids at or below the writeback point.
    pub fn passed(&mut self, wb_id: u64) {
        self.segments.retain(|&s| s > wb_id);
        self.healing.retain(|&s| s > wb_id);
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
            recorded: self.records && !self.needs_record(0),
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
        d.supersede(k, 0b0000_0011, 9);
        assert!(!d.readable(k, 0b0000_0100, loc(9, 0b1111_0011)));
        d.supersede(k, 0b0000_1100, 9);
        assert!(d.readable(k, FULL_LINE, loc(9, FULL_LINE)));
        assert_eq!(d.writeback_limit(9), 4);
        d.supersede(key(1, 3), FULL_LINE, 9);
        assert!(!d.unresolved());
        assert_eq!(d.writeback_limit(9), u64::MAX);
    }

    #[test]
    fn a_recorded_loss_releases_the_evidence_and_heals_are_recorded_as_lost_until_durable() {
        let mut d = Damage {
            records: true,
            ..Default::default()
        };
        d.add_segment(5, Some(&[entry(0, 3, FULL_LINE)]));
        let k = key(0, 3);
        assert!(d.needs_record(10) && d.unrecorded_loss(k, 0b1));
        assert_eq!(d.writeback_limit(10), 4);
        // Two records in a row of the same lost set release it.
        d.record_written(d.changes, 10, true);
        assert_eq!(d.writeback_limit(10), 4);
        assert!(!d.unrecorded_loss(k, 0b1));
        d.record_written(d.changes, 10, true);
        assert!(!d.needs_record(10));
        assert_eq!(d.writeback_limit(10), u64::MAX);
        // A partial heal in segment 12: not durable yet, a record lists it as lost.
        d.supersede(k, 0b11, 12);
        assert_eq!(d.lost.get(&k), Some(&0b1111_1100));
        assert!(d.needs_record(11) && d.unrecorded_loss(k, 0b1));
        assert_eq!(d.record(11), vec![(k, FULL_LINE)]);
        assert_eq!(d.record(12), vec![(k, 0b1111_1100)]);
        // Recorded (as of durable 11): writeback may not pass the heal's segment.
        d.record_written(d.changes, 11, true);
        d.record_written(d.changes, 11, true);
        assert!(!d.needs_record(11));
        assert_eq!(d.writeback_limit(11), 11);
        // Once it is durable, a new record drops it.
        assert!(d.needs_record(12));
        d.record_written(d.changes, 12, true);
        assert_eq!(d.writeback_limit(12), u64::MAX);
        assert!(!d.needs_record(12));
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
