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

/// Where a line's newest copy is: segment id, line slot in it, its dirty bits, whether
/// it is a discard record (reads as zeros), and whether it is a clean copy (a full line
/// identical to the backing device, promoted on a read miss: `dirty` is 0xff).
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
    /// A clean copy: every sector readable from it, none to write back.
    pub clean: bool,
}

impl Loc {
    /// The packed form (checkpoint entries store it): `seg << 24 | slot << 12 |
    /// dirty << 4 | clean << 1 | tomb`.
    pub fn pack(self) -> u64 {
        (self.seg << 24)
            | ((self.slot as u64) << 12)
            | ((self.dirty as u64) << 4)
            | (self.clean as u64) << 1
            | self.tomb as u64
    }

    /// The inverse of [`Loc::pack`].
    pub fn unpack(v: u64) -> Self {
        Loc {
            seg: v >> 24,
            slot: ((v >> 12) & 0x3ff) as u16,
            dirty: ((v >> 4) & 0xff) as u8,
            tomb: v & 1 != 0,
            clean: v & 2 != 0,
        }
    }
}

/// A table slot: packed key (or [`EMPTY`]) and packed [`Loc`].
type Slot = [u64; 2];

/// The table's memory. Anonymous memory the kernel may back with huge pages: the
/// table is large (5 MiB per GiB of cache) and read at random, so 4 KiB pages cost a
/// TLB miss per lookup, and a restart spends most of its time faulting in the new
/// table's pages (64 GiB of cache: 82,000 faults, 0.3 s here, against 0.06 s in
/// 2 MiB pages). On the heap if the mapping fails.
enum Slots {
    Mapped(memmap2::MmapMut),
    Heap(Vec<Slot>),
}

impl Slots {
    /// `n` empty slots.
    fn new(n: usize) -> Self {
        match memmap2::MmapMut::map_anon(n * size_of::<Slot>()) {
            Ok(m) => {
                // Advice only: a kernel without transparent huge pages ignores it.
                let _ = m.advise(memmap2::Advice::HugePage);
                let mut s = Slots::Mapped(m);
                s.fill([EMPTY, 0]);
                s
            }
            Err(_) => Slots::Heap(vec![[EMPTY, 0]; n]),
        }
    }
}

impl std::ops::Deref for Slots {
    type Target = [Slot];
    fn deref(&self) -> &[Slot] {
        match self {
            Slots::Mapped(m) => bytemuck::cast_slice(m),
            Slots::Heap(v) => v,
        }
    }
}

impl std::ops::DerefMut for Slots {
    fn deref_mut(&mut self) -> &mut [Slot] {
        match self {
            Slots::Mapped(m) => bytemuck::cast_slice_mut(m),
            Slots::Heap(v) => v,
        }
    }
}

/// The index table.
pub struct Index {
    slots: Slots,
    len: usize,
    /// Per segment id: lines the index points at (live) and copies ever indexed in it.
    segs: std::collections::BTreeMap<u64, SegLines>,
    /// Entries removed so far (every remove, successful remove_if and forgotten
    /// segment range, and [`Index::invalidate`]): a read that found a line uncached
    /// promotes it only if nothing was removed meanwhile (the backing data may have
    /// changed under it).
    removals: u64,
    /// While a snapshot is taken: every key inserted, removed or moved since it began,
    /// with its packed location before its first change (`None`: absent).
    journal: Option<std::collections::HashMap<u64, Option<u64>>>,
}

/// What the index knows of one log segment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SegLines {
    /// Lines of the segment the index points at (the newest copy of their line).
    pub live: u32,
    /// Line copies indexed in the segment since it was written (live or superseded).
    pub lines: u32,
    /// Live lines that are clean copies (`<= live`): the cleaner drops them for free.
    pub clean: u32,
}

impl SegLines {
    /// Live lines with data the backing devices do not have (dirty or discards).
    pub fn dirty_live(&self) -> u32 {
        self.live - self.clean
    }
}

/// Per-segment line counts of a bulk load in progress ([`Index::begin_bulk`]).
pub struct Bulk {
    first: u64,
    /// Per segment from `first`: live, lines and clean counts side by side, so that
    /// an entry (checkpoints come in hash order, segments at random) costs one cache
    /// line. A segment has fewer than 1024 line slots: the counts fit 16 bits.
    counts: Vec<[u16; 4]>,
    /// New lines not yet added to `counts`: `counts` index `<< 1 | clean`. Counting a
    /// batch in a loop of its own lets the processor have many of those cache misses
    /// (the array is larger than a core's cache for a large cache) in flight at once;
    /// between two probes of the table they were taken one at a time (a 64 GiB
    /// checkpoint: 30 ns per entry before, most of it waiting for the counts).
    pending: Vec<u64>,
}

/// New lines a bulk load counts at once (see [`Bulk::pending`]).
const BULK_BATCH: usize = 4096;

const LIVE: usize = 0;
const LINES: usize = 1;
const CLEAN: usize = 2;

impl Bulk {
    fn at(&self, seg: u64) -> Option<usize> {
        seg.checked_sub(self.first)
            .map(|i| i as usize)
            .filter(|&i| i < self.counts.len())
    }

    /// Adds the pending new lines to `counts`. Saturating: only a checkpoint naming
    /// one line slot twice (which a sound writer never does) could reach the bound.
    fn count_pending(&mut self) {
        for &p in &self.pending {
            let c = &mut self.counts[(p >> 1) as usize];
            c[LIVE] = c[LIVE].saturating_add(1);
            c[LINES] = c[LINES].saturating_add(1);
            c[CLEAN] = c[CLEAN].saturating_add((p & 1) as u16);
        }
        self.pending.clear();
    }
}

/// A snapshot of an [`Index`] taken in chunks (see [`Index::begin_snapshot`]).
pub struct Snapshot {
    /// (key, packed location) copied from the table, in table order.
    pub entries: Vec<(u64, u64)>,
    /// Next table slot to copy.
    pub next: usize,
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
            slots: Slots::new(cap),
            len: 0,
            segs: std::collections::BTreeMap::new(),
            removals: 0,
            journal: None,
        }
    }

    /// The removal count (see the field): compare two readings to learn whether any
    /// entry was removed between them.
    pub fn removals(&self) -> u64 {
        self.removals
    }

    /// Counts an invalidation that removed no entry here (a discard passed to a
    /// backing device): promotions planned before it are refused.
    pub fn invalidate(&mut self) {
        self.removals += 1;
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
        self.removals += 1;
    }

    /// Keeps the per-segment counts: the copy `old` stops being live, `new` starts
    /// (the same copy updated in place changes nothing).
    fn account(&mut self, old: Option<Loc>, new: Option<Loc>) {
        if let (Some(o), Some(n)) = (old, new) {
            if o.seg == n.seg && o.slot == n.slot {
                // Updated in place: only its clean flag can change the counts.
                if o.clean != n.clean {
                    if let Some(s) = self.segs.get_mut(&o.seg) {
                        if n.clean {
                            s.clean += 1;
                        } else {
                            s.clean = s.clean.saturating_sub(1);
                        }
                    }
                }
                return;
            }
        }
        if let Some(o) = old {
            if let Some(s) = self.segs.get_mut(&o.seg) {
                s.live = s.live.saturating_sub(1);
                if o.clean {
                    s.clean = s.clean.saturating_sub(1);
                }
            }
        }
        if let Some(n) = new {
            let s = self.segs.entry(n.seg).or_default();
            s.live += 1;
            s.lines += 1;
            s.clean += n.clean as u32;
        }
    }

    fn note(&mut self, k: u64, old: Option<u64>) {
        if let Some(j) = &mut self.journal {
            j.entry(k).or_insert(old);
        }
    }

    /// Starts a snapshot of the table as it is now. Copy it with
    /// [`Index::snapshot_chunk`] (the table may change between chunks) and finish with
    /// [`Index::end_snapshot`], which gives the state of this instant.
    pub fn begin_snapshot(&mut self) -> Snapshot {
        self.journal = Some(std::collections::HashMap::new());
        Snapshot {
            entries: Vec::with_capacity(self.len),
            next: 0,
        }
    }

    /// Copies up to `n` more table slots into `s`; false once the table is copied.
    pub fn snapshot_chunk(&self, s: &mut Snapshot, n: usize) -> bool {
        let end = (s.next + n).min(self.slots.len());
        if s.next < end {
            s.entries.extend(
                self.slots[s.next..end]
                    .iter()
                    .filter(|[k, _]| *k != EMPTY)
                    .map(|&[k, v]| (k, v)),
            );
        }
        s.next = end;
        end < self.slots.len()
    }

    /// Ends the snapshot: every live (key, packed location) as of
    /// [`Index::begin_snapshot`]. The copied entries of keys changed or moved since are
    /// replaced by the journal's old values; do the merge outside any lock with
    /// [`Snapshot::merge`].
    pub fn end_snapshot(&mut self) -> std::collections::HashMap<u64, Option<u64>> {
        self.journal.take().unwrap_or_default()
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
        self.slots.len() * size_of::<Slot>()
    }

    fn home(&self, k: u64) -> usize {
        ((hash(k) as u128 * self.slots.len() as u128) >> 64) as usize
    }

    fn find(&self, k: u64) -> Result<usize, usize> {
        let slots = &*self.slots;
        let n = slots.len();
        let mut i = self.home(k);
        loop {
            let s = slots[i][0];
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
        self.find(k).ok().map(|i| Loc::unpack(self.slots[i][1]))
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
                let old = self.slots[i][1];
                self.note(k, Some(old));
                self.slots[i][1] = loc.pack();
                Some(Loc::unpack(old))
            }
            Err(i) => {
                if (self.len + 1) * 5 > self.slots.len() * 4 {
                    self.grow();
                    return self.insert_raw(k, loc);
                }
                self.note(k, None);
                self.slots[i] = [k, loc.pack()];
                self.len += 1;
                None
            }
        }
    }

    /// Starts a bulk load of entries whose segments are in `first ..= last` (a
    /// checkpoint): [`Index::bulk_insert`] counts their lines per segment in a dense
    /// array instead of the per-segment map, [`Index::finish_bulk`] adds the counts.
    pub fn begin_bulk(&self, first: u64, last: u64) -> Bulk {
        let n = last.saturating_add(1).saturating_sub(first) as usize;
        Bulk {
            first,
            counts: vec![[0; 4]; n],
            pending: Vec::with_capacity(BULK_BATCH),
        }
    }

    /// [`Index::insert`] during a bulk load (the same table and counts once
    /// [`Index::finish_bulk`] ran).
    pub fn bulk_insert(&mut self, b: &mut Bulk, k: u64, loc: Loc) {
        let old = self.insert_raw(k, loc);
        if let Some(o) = old {
            // The old copy's count may be pending.
            b.count_pending();
            if o.seg == loc.seg && o.slot == loc.slot {
                if o.clean != loc.clean {
                    // The array counts the copy if it counts a live line of its kind
                    // (either count may hold it: they are added).
                    match b.at(o.seg).map(|j| &mut b.counts[j]) {
                        Some(c) if loc.clean && c[LIVE] > c[CLEAN] => c[CLEAN] += 1,
                        Some(c) if !loc.clean && c[CLEAN] > 0 => c[CLEAN] -= 1,
                        _ => self.account(Some(o), Some(loc)),
                    }
                }
                return;
            }
            match b.at(o.seg).map(|j| &mut b.counts[j]) {
                // Either count (the map's or the array's) may hold it: they are added.
                Some(c) if o.clean && c[CLEAN] > 0 => {
                    c[LIVE] -= 1;
                    c[CLEAN] -= 1;
                }
                Some(c) if !o.clean && c[LIVE] > c[CLEAN] => c[LIVE] -= 1,
                _ => self.account(Some(o), None),
            }
        }
        match b.at(loc.seg) {
            Some(i) => {
                b.pending.push((i as u64) << 1 | loc.clean as u64);
                if b.pending.len() == BULK_BATCH {
                    b.count_pending();
                }
            }
            None => self.account(None, Some(loc)),
        }
    }

    /// Ends a bulk load: adds its per-segment counts.
    pub fn finish_bulk(&mut self, mut b: Bulk) {
        b.count_pending();
        for (i, c) in b.counts.iter().enumerate() {
            if c[LINES] > 0 {
                let s = self.segs.entry(b.first + i as u64).or_default();
                s.live += c[LIVE] as u32;
                s.lines += c[LINES] as u32;
                s.clean += c[CLEAN] as u32;
            }
        }
    }

    /// Removes `k` if its location is still `expect` (so a newer copy is never dropped).
    pub fn remove_if(&mut self, k: u64, expect: Loc) -> bool {
        match self.find(k) {
            Ok(i) if Loc::unpack(self.slots[i][1]) == expect => {
                self.delete_at(i);
                self.account(Some(expect), None);
                self.removals += 1;
                true
            }
            _ => false,
        }
    }

    /// Removes `k`; returns its location.
    pub fn remove(&mut self, k: u64) -> Option<Loc> {
        let i = self.find(k).ok()?;
        let old = Loc::unpack(self.slots[i][1]);
        self.delete_at(i);
        self.account(Some(old), None);
        self.removals += 1;
        Some(old)
    }

    fn delete_at(&mut self, mut hole: usize) {
        let n = self.slots.len();
        let [k, v] = self.slots[hole];
        self.note(k, Some(v));
        self.slots[hole] = [EMPTY, 0];
        self.len -= 1;
        let mut i = hole;
        loop {
            i = (i + 1) % n;
            let k = self.slots[i][0];
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
                let [mk, mv] = self.slots[i];
                self.note(mk, Some(mv));
                self.slots[hole] = self.slots[i];
                self.slots[i] = [EMPTY, 0];
                hole = i;
            }
        }
    }

    fn grow(&mut self) {
        // Every entry moves: a snapshot in progress takes them all from the journal.
        if self.journal.is_some() {
            for i in 0..self.slots.len() {
                let [k, v] = self.slots[i];
                if k != EMPTY {
                    self.note(k, Some(v));
                }
            }
        }
        let journal = self.journal.take();
        let n = self.slots.len() * 2;
        let old = std::mem::replace(&mut self.slots, Slots::new(n));
        self.len = 0;
        for &[k, v] in old.iter() {
            if k != EMPTY {
                self.insert_raw(k, Loc::unpack(v));
            }
        }
        self.journal = journal;
    }

    /// Every live (key, location), in table order.
    pub fn iter(&self) -> impl Iterator<Item = (u64, Loc)> + '_ {
        self.slots
            .iter()
            .filter(|[k, _]| *k != EMPTY)
            .map(|&[k, v]| (k, Loc::unpack(v)))
    }
}

impl Snapshot {
    /// The snapshot's entries: those copied, except keys the journal names, which take
    /// their journaled old value (or are dropped when they were absent).
    pub fn merge(self, journal: std::collections::HashMap<u64, Option<u64>>) -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = self
            .entries
            .into_iter()
            .filter(|(k, _)| !journal.contains_key(k))
            .collect();
        out.extend(journal.into_iter().filter_map(|(k, v)| v.map(|v| (k, v))));
        out
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
                clean: rng.gen(),
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
        // The per-segment live and clean counts are exact.
        let mut live: HashMap<u64, u32> = HashMap::new();
        let mut clean: HashMap<u64, u32> = HashMap::new();
        for l in model.values() {
            *live.entry(l.seg).or_default() += 1;
            *clean.entry(l.seg).or_default() += l.clean as u32;
        }
        for (seg, n) in idx.segments() {
            assert_eq!(
                n.live,
                live.get(&seg).copied().unwrap_or(0),
                "seed {seed} seg {seg}"
            );
            assert_eq!(
                n.clean,
                clean.get(&seg).copied().unwrap_or(0),
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
    fn a_chunked_snapshot_is_the_table_as_it_was_when_it_began() {
        let seed: u64 = rand::random();
        println!("seed {seed}");
        let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
        for round in 0..50 {
            // Small tables sometimes grow during the snapshot.
            let mut idx = Index::with_capacity(if round % 5 == 0 { 8 } else { 400 });
            let loc = |rng: &mut rand::rngs::SmallRng| Loc {
                seg: rng.gen_range(1..1 << 40),
                slot: rng.gen_range(0..1024),
                dirty: rng.gen_range(1..=255),
                tomb: false,
                clean: rng.gen_bool(0.2),
            };
            for _ in 0..rng.gen_range(0..300) {
                let k = key(0, rng.gen_range(0..500));
                let l = loc(&mut rng);
                idx.insert(k, l);
            }
            let mut want: Vec<(u64, u64)> = idx.iter().map(|(k, l)| (k, l.pack())).collect();
            want.sort_unstable();
            let mut snap = idx.begin_snapshot();
            let chunk = rng.gen_range(1..64);
            while idx.snapshot_chunk(&mut snap, chunk) {
                for _ in 0..rng.gen_range(0..20) {
                    let k = key(0, rng.gen_range(0..500));
                    if rng.gen_bool(0.5) {
                        let l = loc(&mut rng);
                        idx.insert(k, l);
                    } else {
                        idx.remove(k);
                    }
                }
            }
            let journal = idx.end_snapshot();
            let mut got = snap.merge(journal);
            got.sort_unstable();
            assert_eq!(got, want, "seed {seed} round {round}");
        }
    }

    #[test]
    fn a_bulk_load_counts_like_single_inserts() {
        let seed: u64 = rand::random();
        println!("seed {seed}");
        let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
        let mut one = Index::with_capacity(64);
        let mut bulk = Index::with_capacity(64);
        // Entries before the load, counted in the map.
        let entry = |rng: &mut rand::rngs::SmallRng, lines: u64| {
            let k = key(0, rng.gen_range(0..lines));
            let loc = Loc {
                seg: rng.gen_range(1..40),
                slot: rng.gen_range(0..4),
                dirty: 1,
                tomb: false,
                clean: rng.gen_bool(0.3),
            };
            (k, loc)
        };
        for _ in 0..200 {
            let (k, loc) = entry(&mut rng, 400);
            one.insert(k, loc);
            bulk.insert(k, loc);
        }
        let mut b = bulk.begin_bulk(10, 30);
        for i in 0..20_000 {
            // Duplicates, repeated copies, and segments outside the bulk range; then
            // runs of new lines longer than a counting batch between duplicates.
            let lines = if i < 2000 { 400 } else { 1 << 20 };
            let (k, loc) = entry(&mut rng, lines);
            one.insert(k, loc);
            bulk.bulk_insert(&mut b, k, loc);
        }
        bulk.finish_bulk(b);
        assert_eq!(
            one.segments().collect::<Vec<_>>(),
            bulk.segments().collect::<Vec<_>>(),
            "seed {seed}"
        );
        assert_eq!(
            one.iter().collect::<Vec<_>>(),
            bulk.iter().collect::<Vec<_>>()
        );
    }

    #[test]
    fn memory_is_at_most_20_bytes_per_planned_line() {
        let lines = (1usize << 30) / 4096;
        let idx = Index::with_capacity(lines);
        assert!(idx.memory_bytes() <= lines * 20);
    }

    #[test]
    fn a_clean_copy_packs_beside_the_discard_bit() {
        let l = Loc {
            seg: (1 << 40) - 1,
            slot: 1023,
            dirty: 0xff,
            tomb: false,
            clean: true,
        };
        assert_eq!(l.pack() & 3, 2);
        assert_eq!(Loc::unpack(l.pack()), l);
        let mut idx = Index::with_capacity(16);
        let r = idx.removals();
        idx.insert(key(0, 1), l);
        assert_eq!(idx.removals(), r, "an insert removes nothing");
        idx.remove(key(0, 1));
        assert!(idx.removals() > r);
        let r = idx.removals();
        idx.forget_segments(5);
        assert!(idx.removals() > r);
    }

    #[test]
    fn key_round_trip() {
        assert_eq!(unkey(key(254, LINE_MASK)), (254, LINE_MASK));
        assert_ne!(key(254, LINE_MASK), EMPTY);
    }
}
