//! The hash index: (backing device, line) -> where the newest copy of that line lives.
//!
//! An open-addressing table of 16-byte slots (a packed key and a packed [`Loc`]) with
//! linear probing and backward-shift deletion, sized once for the cache's line capacity
//! at a load factor of at most 0.8, so the index costs about 20 bytes per 4 KiB line
//! (5 MiB per GiB of cache). It grows (doubling) only if more lines than planned are
//! live, which the engine's accounting prevents.
//!
//! Every change of a line's newest copy also keeps, per log segment, how many of its
//! lines are live (the index points at them) and how many copies were indexed in it:
//! the cleaner (`clean.rs`) decides from these, and they are exact by construction
//! because every insert, replace and removal goes through this table.

/// Key of a line: device id in the top 8 bits, line number (byte offset / 4096) below.
pub fn key(dev: u8, line: u64) -> u64 {
    ((dev as u64) << 56) | (line & LINE_MASK)
}

/// Splits a key back into (device id, line number).
pub fn unkey(k: u64) -> (u8, u64) {
    ((k >> 56) as u8, k & LINE_MASK)
}

/// Largest line number a key can hold.
pub const LINE_MASK: u64 = (1 << 56) - 1;
const EMPTY: u64 = u64::MAX;

/// Where a line's newest copy is: segment id, line slot in it, its dirty bits, and
/// whether it is a discard record (reads as zeros).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Loc {
    /// Segment id (< 2^40).
    pub seg: u64,
    /// Line slot within the segment (< 1024).
    pub slot: u16,
    /// Dirty sector bits.
    pub dirty: u8,
    /// A discard record.
    pub tomb: bool,
}

impl Loc {
    fn pack(self) -> u64 {
        (self.seg << 24)
            | ((self.slot as u64) << 12)
            | ((self.dirty as u64) << 4)
            | self.tomb as u64
    }

    fn unpack(v: u64) -> Self {
        Loc {
            seg: v >> 24,
            slot: ((v >> 12) & 0x3ff) as u16,
            dirty: ((v >> 4) & 0xff) as u8,
            tomb: v & 1 != 0,
        }
    }
}

/// The index table.
pub struct Index {
    slots: Vec<(u64, u64)>,
    len: usize,
    /// Per segment id: lines the index points at (live) and copies ever indexed in it.
    segs: std::collections::BTreeMap<u64, SegLines>,
}

/// What the index knows of one log segment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SegLines {
    /// Lines of the segment the index points at (the newest copy of their line).
    pub live: u32,
    /// Line copies indexed in the segment since it was written (live or superseded).
    pub lines: u32,
}

fn hash(k: u64) -> u64 {
    let mut x = k ^ (k >> 31);
    x = x.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    x ^ (x >> 29)
}

impl Index {
    /// A table for up to `planned` live entries.
    pub fn with_capacity(planned: usize) -> Self {
        let cap = (planned + planned / 4).max(16);
        Index {
            slots: vec![(EMPTY, 0); cap],
            len: 0,
            segs: std::collections::BTreeMap::new(),
        }
    }

    /// Live and indexed lines of segment `seg` (zero when unknown).
    pub fn seg_lines(&self, seg: u64) -> SegLines {
        self.segs.get(&seg).copied().unwrap_or_default()
    }

    /// Every segment with indexed lines, in id order.
    pub fn segments(&self) -> impl Iterator<Item = (u64, SegLines)> + '_ {
        self.segs.iter().map(|(&s, &l)| (s, l))
    }

    /// Forgets the line counts of segments `..=upto` (their slots were released).
    pub fn forget_segments(&mut self, upto: u64) {
        self.segs = self.segs.split_off(&(upto + 1));
    }

    /// Keeps the per-segment counts: the copy `old` stops being live, `new` starts
    /// (the same copy updated in place changes nothing).
    fn account(&mut self, old: Option<Loc>, new: Option<Loc>) {
        if let (Some(o), Some(n)) = (old, new) {
            if o.seg == n.seg && o.slot == n.slot {
                return;
            }
        }
        if let Some(o) = old {
            if let Some(s) = self.segs.get_mut(&o.seg) {
                s.live = s.live.saturating_sub(1);
            }
        }
        if let Some(n) = new {
            let s = self.segs.entry(n.seg).or_default();
            s.live += 1;
            s.lines += 1;
        }
    }

    /// Live entries.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when no entry is live.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes of RAM held by the table.
    pub fn memory_bytes(&self) -> usize {
        self.slots.len() * std::mem::size_of::<(u64, u64)>()
    }

    fn home(&self, k: u64) -> usize {
        ((hash(k) as u128 * self.slots.len() as u128) >> 64) as usize
    }

    fn find(&self, k: u64) -> Result<usize, usize> {
        let n = self.slots.len();
        let mut i = self.home(k);
        loop {
            let s = self.slots[i].0;
            if s == k {
                return Ok(i);
            }
            if s == EMPTY {
                return Err(i);
            }
            i += 1;
            if i == n {
                i = 0;
            }
        }
    }

    /// The location of `k`, if cached.
    pub fn get(&self, k: u64) -> Option<Loc> {
        self.find(k).ok().map(|i| Loc::unpack(self.slots[i].1))
    }

    /// Inserts or replaces; returns the previous location.
    pub fn insert(&mut self, k: u64, loc: Loc) -> Option<Loc> {
        let old = self.insert_raw(k, loc);
        self.account(old, Some(loc));
        old
    }

    fn insert_raw(&mut self, k: u64, loc: Loc) -> Option<Loc> {
        debug_assert!(k != EMPTY);
        match self.find(k) {
            Ok(i) => {
                let old = Loc::unpack(self.slots[i].1);
                self.slots[i].1 = loc.pack();
                Some(old)
            }
            Err(i) => {
                if (self.len + 1) * 5 > self.slots.len() * 4 {
                    self.grow();
                    return self.insert_raw(k, loc);
                }
                self.slots[i] = (k, loc.pack());
                self.len += 1;
                None
            }
        }
    }

    /// Removes `k` if its location is still `expect` (so a newer copy is never dropped).
    pub fn remove_if(&mut self, k: u64, expect: Loc) -> bool {
        match self.find(k) {
            Ok(i) if Loc::unpack(self.slots[i].1) == expect => {
                self.delete_at(i);
                self.account(Some(expect), None);
                true
            }
            _ => false,
        }
    }

    /// Removes `k`; returns its location.
    pub fn remove(&mut self, k: u64) -> Option<Loc> {
        let i = self.find(k).ok()?;
        let old = Loc::unpack(self.slots[i].1);
        self.delete_at(i);
        self.account(Some(old), None);
        Some(old)
    }

    fn delete_at(&mut self, mut hole: usize) {
        let n = self.slots.len();
        self.slots[hole] = (EMPTY, 0);
        self.len -= 1;
        let mut i = hole;
        loop {
            i = (i + 1) % n;
            let k = self.slots[i].0;
            if k == EMPTY {
                return;
            }
            let home = self.home(k);
            // Move the entry back if its home is not cyclically in (hole, i].
            let in_range = if hole <= i {
                home > hole && home <= i
            } else {
                home > hole || home <= i
            };
            if !in_range {
                self.slots[hole] = self.slots[i];
                self.slots[i] = (EMPTY, 0);
                hole = i;
            }
        }
    }

    fn grow(&mut self) {
        let old = std::mem::replace(&mut self.slots, vec![(EMPTY, 0); 1]);
        self.slots = vec![(EMPTY, 0); old.len() * 2];
        self.len = 0;
        for (k, v) in old {
            if k != EMPTY {
                self.insert_raw(k, Loc::unpack(v));
            }
        }
    }

    /// Every live (key, location), in table order.
    pub fn iter(&self) -> impl Iterator<Item = (u64, Loc)> + '_ {
        self.slots
            .iter()
            .filter(|(k, _)| *k != EMPTY)
            .map(|&(k, v)| (k, Loc::unpack(v)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use std::collections::HashMap;

    #[test]
    fn matches_a_hashmap_under_random_operations() {
        let seed: u64 = rand::random();
        println!("seed {seed}");
        let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
        let mut idx = Index::with_capacity(64);
        let mut model: HashMap<u64, Loc> = HashMap::new();
        for _ in 0..200_000 {
            let k = key(rng.gen_range(0..3), rng.gen_range(0..300));
            let loc = Loc {
                seg: if rng.gen_bool(0.5) {
                    rng.gen_range(1..50)
                } else {
                    rng.gen_range(1..1 << 40)
                },
                slot: rng.gen_range(0..1024),
                dirty: rng.gen(),
                tomb: rng.gen(),
            };
            match rng.gen_range(0..4) {
                0 | 1 => assert_eq!(idx.insert(k, loc), model.insert(k, loc), "seed {seed}"),
                2 => assert_eq!(idx.remove(k), model.remove(&k), "seed {seed}"),
                _ => {
                    if let Some(&cur) = model.get(&k) {
                        assert!(idx.remove_if(k, cur));
                        model.remove(&k);
                    } else {
                        assert!(!idx.remove_if(k, loc));
                    }
                }
            }
            assert_eq!(idx.len(), model.len());
        }
        // The per-segment live counts are exact.
        let mut live: HashMap<u64, u32> = HashMap::new();
        for l in model.values() {
            *live.entry(l.seg).or_default() += 1;
        }
        for (seg, n) in idx.segments() {
            assert_eq!(
                n.live,
                live.get(&seg).copied().unwrap_or(0),
                "seed {seed} seg {seg}"
            );
            assert!(n.lines >= n.live);
        }
        for (seg, n) in &live {
            assert_eq!(idx.seg_lines(*seg).live, *n, "seed {seed}");
        }
        for (k, v) in &model {
            assert_eq!(idx.get(*k), Some(*v), "seed {seed}");
        }
        assert_eq!(idx.iter().count(), model.len());
    }

    #[test]
    fn memory_is_at_most_20_bytes_per_planned_line() {
        let lines = (1usize << 30) / 4096;
        let idx = Index::with_capacity(lines);
        assert!(idx.memory_bytes() <= lines * 20);
    }

    #[test]
    fn key_round_trip() {
        assert_eq!(unkey(key(254, LINE_MASK)), (254, LINE_MASK));
        assert_ne!(key(254, LINE_MASK), EMPTY);
    }
}
