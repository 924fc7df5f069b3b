//! The crc of every line on the cache device, by slot: what a read checks a line it
//! takes from the cache device against (docs/DESIGN.md, "Line checks on reads").
//!
//! One `u32` per line slot of the device and, per segment slot, which segment those
//! crcs belong to and how many of its lines (a prefix: appends and the final header
//! make lines durable in slot order) are known. Filled as crcs become durable, or from
//! a segment's header read back; never guessed: a line not known is
//! [`LineCheck::Unknown`], and the caller reads the header.

use crate::format::{Geometry, SegmentHeader};

/// What a read checks a cache-device line against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum LineCheck {
    /// Its crc32c.
    Crc(u32),
    /// Nothing: its header records no line crcs (format 1 before line checks).
    Unchecked,
    /// Its segment's header, read back, does not list the line: the copy the index
    /// holds there has no crc, which counts as rot.
    Unlisted,
    /// Not known here: the segment's header must be read first.
    Unknown,
}

/// What is known of one segment slot.
#[derive(Clone, Copy, Debug, Default)]
struct SlotState {
    /// The segment whose crcs the slot's lines hold (0: none; ids start at 1).
    seg: u64,
    /// Lines `0..known` have their crc recorded.
    known: u16,
    /// Lines from `known` on have no crc in the segment's header.
    unchecked: bool,
    /// The header was read back: lines past those it lists are not in the segment.
    complete: bool,
}

/// The line crcs of the cache device.
pub(crate) struct LineCrcs {
    nr_segments: u64,
    lines_per_segment: usize,
    slots: Vec<SlotState>,
    crcs: Vec<u32>,
}

impl LineCrcs {
    /// Nothing known, for a cache of geometry `geo` (zeroed memory: the pages of
    /// slots never recorded are not touched).
    pub(crate) fn new(geo: &Geometry) -> Self {
        Self::with_size(geo.nr_segments, geo.lines_per_segment as usize)
    }

    fn with_size(nr_segments: u64, lines_per_segment: usize) -> Self {
        LineCrcs {
            nr_segments,
            lines_per_segment,
            slots: vec![SlotState::default(); nr_segments as usize],
            crcs: vec![0; nr_segments as usize * lines_per_segment],
        }
    }

    fn slot_of(&self, seg: u64) -> usize {
        ((seg - 1) % self.nr_segments) as usize
    }

    /// Records the crcs of lines `first..` of segment `seg` (`None`: the header
    /// records none). A slot holding another segment's crcs is taken over; lines after
    /// a gap in what is known are not recorded (they stay unknown).
    pub(crate) fn record(
        &mut self,
        seg: u64,
        first: usize,
        crcs: impl Iterator<Item = Option<u32>>,
    ) {
        let s = self.slot_of(seg);
        let mut st = self.slots[s];
        if st.seg != seg {
            st = SlotState {
                seg,
                ..SlotState::default()
            };
        }
        if first <= st.known as usize && !st.unchecked {
            let base = s * self.lines_per_segment;
            for (i, c) in crcs.enumerate() {
                let line = first + i;
                if line >= self.lines_per_segment {
                    break;
                }
                match c {
                    Some(c) => self.crcs[base + line] = c,
                    None => {
                        st.unchecked = true;
                        st.known = st.known.max(line as u16);
                        break;
                    }
                }
                st.known = st.known.max(line as u16 + 1);
            }
        }
        self.slots[s] = st;
    }

    /// Records every line crc of header `h`, read back from the device: lines past
    /// those it lists are [`LineCheck::Unlisted`] from now on.
    pub(crate) fn record_header(&mut self, h: &SegmentHeader) {
        let s = self.slot_of(h.id);
        self.slots[s] = SlotState {
            seg: h.id,
            ..SlotState::default()
        };
        self.record(h.id, 0, h.entries.iter().map(|e| e.crc));
        self.slots[s].complete = true;
    }

    /// What line `slot` of segment `seg` is checked against.
    pub(crate) fn check(&self, seg: u64, slot: u16) -> LineCheck {
        let s = self.slot_of(seg);
        let st = self.slots[s];
        if st.seg != seg {
            return LineCheck::Unknown;
        }
        if slot < st.known {
            LineCheck::Crc(self.crcs[s * self.lines_per_segment + slot as usize])
        } else if st.unchecked {
            LineCheck::Unchecked
        } else if st.complete {
            LineCheck::Unlisted
        } else {
            LineCheck::Unknown
        }
    }

    /// Bytes of RAM this takes.
    pub(crate) fn memory_bytes(&self) -> usize {
        self.slots.len() * size_of::<SlotState>() + self.crcs.len() * size_of::<u32>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::Entry;

    fn table() -> LineCrcs {
        LineCrcs::with_size(4, 8)
    }

    #[test]
    fn crcs_are_known_only_as_recorded_and_per_segment() {
        let mut c = table();
        assert_eq!(c.check(1, 0), LineCheck::Unknown);
        c.record(1, 0, [Some(10), Some(11)].into_iter());
        assert_eq!(c.check(1, 1), LineCheck::Crc(11));
        assert_eq!(c.check(1, 2), LineCheck::Unknown);
        // A gap: lines after it stay unknown.
        c.record(1, 3, [Some(13)].into_iter());
        assert_eq!(c.check(1, 3), LineCheck::Unknown);
        c.record(1, 2, [Some(12), Some(13)].into_iter());
        assert_eq!(c.check(1, 3), LineCheck::Crc(13));
        // Segment 5 takes segment 1's slot (4 slots): 1 is no longer known.
        c.record(5, 0, [Some(50)].into_iter());
        assert_eq!(c.check(1, 0), LineCheck::Unknown);
        assert_eq!(c.check(5, 0), LineCheck::Crc(50));
    }

    #[test]
    fn a_header_read_back_makes_unlisted_lines_rot_and_old_headers_unchecked() {
        let mut c = table();
        let entry = |crc| Entry {
            sector: 0,
            dev: 0,
            dirty: 0xff,
            flags: 0,
            crc,
        };
        let mut h = SegmentHeader {
            id: 2,
            lap: 1,
            gen: 1,
            nonce: 0,
            prev_crc: 0,
            durable: 0,
            data_crc: 0,
            uuid: [0; 16],
            entries: vec![entry(Some(7)), entry(Some(8))],
        };
        c.record_header(&h);
        assert_eq!(c.check(2, 1), LineCheck::Crc(8));
        assert_eq!(c.check(2, 2), LineCheck::Unlisted);
        h.entries = vec![entry(None), entry(None)];
        c.record_header(&h);
        assert_eq!(c.check(2, 0), LineCheck::Unchecked);
        assert_eq!(c.check(2, 5), LineCheck::Unchecked);
    }
}
