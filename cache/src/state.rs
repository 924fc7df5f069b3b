//! The engine's shared state: everything behind `Inner::state` (one mutex), the
//! in-RAM segments, the backing-device slots, and the few operations on it that every
//! thread needs (lock, wait, seal). The user-facing API (`engine.rs`), the flusher
//! (`flush.rs`) and writeback (`writeback.rs`) build on this module; it depends on none
//! of them.

use std::collections::BTreeMap;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use slog::Logger;

use crate::damage::Damage;
use crate::device::{AlignedBuf, BlockDevice};
use crate::error::Error;
use crate::format::{crc, Entry, Geometry, SegmentHeader, LINE, MAX_BACKING};
use crate::index::Index;
use crate::stats::Counters;
use crate::tunables::Tunables;

/// The segment being filled.
pub(crate) struct OpenSeg {
    pub id: u64,
    pub buf: AlignedBuf,
    pub entries: Vec<Entry>,
    pub last_write: Instant,
}

/// A sealed segment: header encoded in `buf`, immutable until flushed.
pub(crate) struct Sealed {
    pub id: u64,
    pub buf: AlignedBuf,
    pub len: usize,
}

pub(crate) struct BackingSlot {
    pub dev: Arc<dyn BlockDevice>,
    pub label: String,
    pub dirty: u64,
    pub needs_flush: bool,
    /// The access counters of this device alone.
    pub counters: Counters,
    /// Writeback to this device is failing: since when, and the last error.
    pub failing: Option<BackingFailure>,
}

/// A backing device whose writeback fails (kept until a batch succeeds).
#[derive(Clone, Debug)]
pub(crate) struct BackingFailure {
    pub since: Instant,
    pub since_wall: std::time::SystemTime,
    pub error: String,
}

impl State {
    /// Counts one line access (see [`crate::stats::counter_index`]) for the cache and
    /// for backing device `dev`.
    pub(crate) fn count(&mut self, dev: u8, counter: usize) {
        self.counters[counter] += 1;
        if let Some(b) = self.backing.get_mut(dev as usize).and_then(|b| b.as_mut()) {
            b.counters[counter] += 1;
        }
    }

    /// The refusal for a write to backing device `dev` when writeback to it has failed
    /// for longer than `writeback_fail_timeout_s`.
    pub(crate) fn backing_refusal(&self, dev: u8) -> Option<Error> {
        let timeout = Duration::from_secs(self.tunables.writeback_fail_timeout_s as u64);
        let f = self.backing.get(dev as usize)?.as_ref()?.failing.as_ref()?;
        (f.since.elapsed() >= timeout).then(|| Error::BackingFailed {
            dev,
            secs: f.since.elapsed().as_secs(),
            reason: f.error.clone(),
        })
    }

    /// The refusal for a caller waiting for log space (or durability) that writeback
    /// cannot make: it stops before a damaged segment kept as evidence (the flusher
    /// waits for free slots and none can come), or a backing device has failed for
    /// too long.
    pub(crate) fn stuck_refusal(&self) -> Option<Error> {
        if !self.need_space {
            return None;
        }
        let limit = self.damage.writeback_limit();
        if limit <= self.wb_id {
            return Some(Error::LogBlocked { segment: limit + 1 });
        }
        if self.clean.tail_movable {
            // The cleaner frees the tail without the backing devices.
            return None;
        }
        (0..self.backing.len()).find_map(|d| self.backing_refusal(d as u8))
    }
}

pub(crate) struct State {
    pub index: Index,
    pub backing: Vec<Option<BackingSlot>>,
    pub open: Option<OpenSeg>,
    pub next_id: u64,
    pub ram: BTreeMap<u64, Arc<Sealed>>,
    pub pool: Vec<AlignedBuf>,
    pub ram_buffers: usize,
    pub prev_crc: u32,
    pub write_started_id: u64,
    /// Highest segment id written to the cache device (maybe not yet flushed).
    pub written_id: u64,
    /// When `written_id` first got ahead of `flushed_id`.
    pub unflushed_since: Option<Instant>,
    /// Highest segment id a caller waits to be durable.
    pub durable_req: u64,
    pub flushed_id: u64,
    pub wb_id: u64,
    pub sb_seq: u64,
    /// Earliest pending flush request and the highest segment id it waits for.
    pub flush_req: Option<(Instant, u64)>,
    pub seal_requested: bool,
    pub need_space: bool,
    pub drains: u32,
    /// Callers currently inside [`Cache::write`]: a flush waits the barrier deadline for
    /// more lines only when some other write could join the segment.
    pub active_writers: u32,
    pub commit_requested: bool,
    pub tunables: Tunables,
    pub counters: Counters,
    pub cache_bytes_written: u64,
    pub backing_bytes_written: u64,
    pub partial_segments: u64,
    pub failed: Option<String>,
    /// Damaged log segments and the data lost with them (see `damage.rs`).
    pub damage: Damage,
    pub stop_flush: bool,
    pub stop_writeback: bool,
    /// The cleaner's counters (`clean.rs`).
    pub clean: crate::clean::CleanState,
}

/// What [`State::new`] starts from: recovery's result.
pub(crate) struct Recovered {
    pub index: Index,
    pub backing: Vec<Option<BackingSlot>>,
    /// The last segment walked (replayed or damaged) and its header crc.
    pub last_id: u64,
    pub last_crc: u32,
    pub wb_id: u64,
    pub sb_seq: u64,
    pub damage: Damage,
}

impl State {
    /// The state of a cache just opened: everything up to `last_id` durable on the
    /// cache device, `ram_buffers` empty segment buffers.
    pub(crate) fn new(
        r: Recovered,
        geo: &Geometry,
        ram_buffers: usize,
        tunables: Tunables,
    ) -> State {
        State {
            index: r.index,
            backing: r.backing,
            open: None,
            next_id: r.last_id + 1,
            ram: BTreeMap::new(),
            pool: (0..ram_buffers)
                .map(|_| AlignedBuf::new(geo.segment_size as usize))
                .collect(),
            ram_buffers,
            prev_crc: r.last_crc,
            write_started_id: r.last_id,
            written_id: r.last_id,
            unflushed_since: None,
            durable_req: 0,
            flushed_id: r.last_id,
            wb_id: r.wb_id,
            sb_seq: r.sb_seq,
            flush_req: None,
            seal_requested: false,
            need_space: false,
            drains: 0,
            active_writers: 0,
            commit_requested: false,
            tunables,
            counters: [0; 16],
            cache_bytes_written: 0,
            backing_bytes_written: 0,
            partial_segments: 0,
            failed: None,
            damage: r.damage,
            stop_flush: false,
            stop_writeback: false,
            clean: Default::default(),
        }
    }
}

pub(crate) struct Inner {
    pub cache: Arc<dyn BlockDevice>,
    pub geo: Geometry,
    pub uuid: [u8; 16],
    pub nonce: u64,
    pub state: Mutex<State>,
    /// Wakes callers waiting for buffers, flush progress or drain progress.
    pub io_cv: Condvar,
    /// Wakes the flusher and writeback threads.
    pub worker_cv: Condvar,
    pub log: Logger,
}

impl Inner {
    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn wait_io<'a>(
        &self,
        g: MutexGuard<'a, State>,
        t: Duration,
    ) -> MutexGuard<'a, State> {
        self.io_cv
            .wait_timeout(g, t)
            .unwrap_or_else(|e| e.into_inner())
            .0
    }

    pub(crate) fn cache_desc(&self) -> String {
        self.cache.describe()
    }

    /// Seals the open segment (if it has lines): encodes its header, moves it to `ram`.
    pub(crate) fn seal(&self, st: &mut State) {
        let has_lines = st.open.as_ref().is_some_and(|o| !o.entries.is_empty());
        if !has_lines {
            return;
        }
        let mut o = st.open.take().expect("open segment");
        let hl = self.geo.header_len();
        let n = o.entries.len();
        let len = hl + n * LINE as usize;
        let data_crc = crc(&o.buf[hl..len]);
        let hdr = SegmentHeader {
            id: o.id,
            lap: self.geo.lap(o.id),
            nonce: self.nonce,
            prev_crc: st.prev_crc,
            durable: st.flushed_id,
            data_crc,
            uuid: self.uuid,
            entries: std::mem::take(&mut o.entries),
        };
        st.prev_crc = hdr.encode_into(&mut o.buf[..hl]);
        if n < self.geo.lines_per_segment as usize {
            st.partial_segments += 1;
        }
        st.ram.insert(
            o.id,
            Arc::new(Sealed {
                id: o.id,
                buf: o.buf,
                len,
            }),
        );
        self.worker_cv.notify_all();
    }
}

pub(crate) fn backing_table(st: &State) -> Vec<Option<crate::format::BackingRecord>> {
    let mut v = vec![None; MAX_BACKING];
    for (i, b) in st.backing.iter().enumerate() {
        if let Some(b) = b {
            v[i] = Some(crate::format::BackingRecord {
                size: b.dev.size(),
                label: b.label.clone(),
            });
        }
    }
    v
}
