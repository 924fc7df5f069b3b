//! The engine's shared state: everything behind `Inner::state` (one mutex), the
//! in-RAM segments, the backing-device slots, and the few operations on it that every
//! thread needs (lock, wait, open and seal a segment, ask for durability, fail). The
//! user-facing API (`engine.rs`, `open.rs`) and the threads (`flush.rs`, `writeback.rs`
//! with `clean.rs`, `checkpoint.rs`) build on this module; it depends on none of them.

use std::collections::BTreeMap;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use slog::Logger;

use crate::damage::Damage;
use crate::device::{AlignedBuf, BlockDevice};
use crate::error::{Error, Failure, Result};
use crate::format::{Entry, Geometry, SegmentHeader, LINE, MAX_BACKING, SEAL_AHEAD};
use crate::index::Index;
use crate::stats::Counters;
use crate::tunables::Tunables;

/// A point in the log: segment `id` up to its first `lines` lines ([`Pos::ALL`]: the
/// whole segment, sealed).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Pos {
    pub id: u64,
    pub lines: u32,
}

impl Pos {
    /// `lines` of a segment taken whole.
    pub const ALL: u32 = u32::MAX;

    /// Segment `id`, whole.
    pub fn all(id: u64) -> Pos {
        Pos {
            id,
            lines: Pos::ALL,
        }
    }
}

/// The segment being filled.
pub(crate) struct OpenSeg {
    pub id: u64,
    pub buf: AlignedBuf,
    pub entries: Vec<Entry>,
    pub last_write: Instant,
    /// Format 2: lines `0..written` are durable under the newest header (or being made
    /// so by an append).
    pub written: usize,
    /// Format 2: lines `0..staged` (`>= written`) are on the cache device or being
    /// written there (staged ahead of an append, see `flush.rs`) and immutable: a
    /// rewrite of one of them takes a new line. When `staged > 0` both header copies
    /// in the slot were written as zeros or by an append.
    pub staged: usize,
    /// Appends written so far (the generation of the newest header on the device).
    pub gen: u16,
    /// crc32c of lines `0..written`.
    pub crc: u32,
    /// crc of the newest header written by an append.
    pub hcrc: u32,
}

/// A sealed segment, immutable until written. Lines `from..n` and the final header
/// (copy `header_copy(gen)`) still have to be written (`from` > 0 when appends or
/// staging wrote the lines before it). The header is encoded by the flusher when it
/// writes the segment, not by the seal: its data crc over up to a whole segment is the
/// costliest step of a seal, and the seal runs under the engine lock on a writer's
/// thread. The flusher writes segments in id order, so it also carries the chain of
/// header crcs (`State::prev_crc`).
pub(crate) struct Sealed {
    pub id: u64,
    pub buf: AlignedBuf,
    pub from: usize,
    pub n: usize,
    pub gen: u16,
    /// The final header to encode and write; `None` when the newest append's header
    /// (crc `hcrc`) covers all `n` lines and is final.
    pub header: Option<PendingHeader>,
    pub hcrc: u32,
}

/// What a sealed segment's final header holds besides its data crc and `prev_crc`,
/// both of which the flusher computes ([`PendingHeader::encode`]).
pub(crate) struct PendingHeader {
    /// The durable point claimed (taken at the seal, as an encoded header would have).
    pub durable: u64,
    /// crc32c of lines `0..written` (the appends'), extended over `written..n`.
    pub crc: u32,
    pub written: usize,
    pub entries: Vec<Entry>,
}

impl PendingHeader {
    /// Encodes `seg`'s final header after the header of crc `prev_crc` into a buffer
    /// of one header copy; returns it with its crc (the next header's `prev_crc`) and
    /// the crcs of lines `written..n`, which it computed.
    pub(crate) fn encode(
        &self,
        inner: &Inner,
        seg: &Sealed,
        prev_crc: u32,
    ) -> (AlignedBuf, u32, Vec<Option<u32>>) {
        let geo = &inner.geo;
        let (ds, line) = (geo.data_start(), LINE as usize);
        let mut entries = self.entries.clone();
        let data_crc = crate::format::seal_lines(
            self.crc,
            &mut entries[self.written..seg.n],
            &seg.buf[ds + self.written * line..ds + seg.n * line],
        );
        let hdr = SegmentHeader {
            id: seg.id,
            lap: geo.lap(seg.id),
            gen: seg.gen,
            nonce: inner.nonce,
            prev_crc,
            durable: self.durable,
            data_crc,
            uuid: inner.uuid,
            entries,
        };
        let mut b = AlignedBuf::new(geo.header_len());
        let crc = hdr.encode_into(&mut b);
        let lines = hdr.entries[self.written..].iter().map(|e| e.crc).collect();
        (b, crc, lines)
    }
}

pub(crate) struct BackingSlot {
    pub dev: Arc<dyn BlockDevice>,
    pub label: String,
    pub dirty: u64,
    /// The access counters of this device alone.
    pub counters: Counters,
    /// Writeback to this device is failing: since when, and the last error.
    pub failing: Option<BackingFailure>,
    /// Lines of this device promoted into the cache on read misses.
    pub promoted: u64,
    /// Changes made to this device outside writeback (discards passed to it, writes
    /// that went around the cache), and how many of them a flush of it made durable:
    /// while they differ a crash could undo one on the device, so no read of it is
    /// promoted (the clean copy would outlive the undo), and a flush request flushes
    /// it.
    pub changes_issued: u64,
    pub changes_flushed: u64,
    /// The log may hold clean copies of this device's lines (one was promoted since
    /// open, or recovery restored one): a discard then makes its records durable
    /// before it passes to the device.
    pub may_hold_clean: bool,
    /// The sequential read streams being followed (promotion skips long streams).
    pub stream: Stream,
    /// The sequential write streams (write-around past `sequential_cutoff`).
    pub wstream: Stream,
    /// Bytes and writes that went around the cache to this device.
    pub bypassed_bytes: u64,
    pub bypassed_writes: u64,
    /// The first segment id that may hold lines of this device (the superblock
    /// table's `since`): older segments' lines of its id are a detached device's.
    pub since: u64,
}

impl BackingSlot {
    /// A device just attached (at open or later): nothing dirty, counted or failing.
    pub fn new(dev: Arc<dyn BlockDevice>, label: String, since: u64) -> Self {
        BackingSlot {
            dev,
            label,
            dirty: 0,
            counters: [0; 16],
            failing: None,
            promoted: 0,
            changes_issued: 0,
            changes_flushed: 0,
            may_hold_clean: false,
            stream: Default::default(),
            wstream: Default::default(),
            bypassed_bytes: 0,
            bypassed_writes: 0,
            since,
        }
    }
}

/// Sequential streams of requests (reads or writes) of one backing device. A request
/// continues a stream when it starts where one of the last [`STREAM_RECENT`] requests
/// ended (a queue of commands may arrive a little out of order); the same request seen
/// again (tried on the event loop, then run on a worker) is counted once.
#[derive(Default)]
pub(crate) struct Stream {
    /// (start, end, length of the stream it ends), oldest first.
    recent: std::collections::VecDeque<(u64, u64, u64)>,
}

/// Requests a [`Stream`] remembers.
const STREAM_RECENT: usize = 8;

impl Stream {
    /// Counts a request of `len` bytes at `offset`; returns the length of the stream it
    /// belongs to (itself included).
    pub fn follow(&mut self, offset: u64, len: u64) -> u64 {
        let end = offset.saturating_add(len);
        if let Some(r) = self.recent.iter().find(|r| r.0 == offset && r.1 == end) {
            return r.2;
        }
        let run = self
            .recent
            .iter()
            .filter(|r| r.1 == offset)
            .map(|r| r.2)
            .max()
            .map_or(len, |l| l.saturating_add(len));
        if self.recent.len() == STREAM_RECENT {
            self.recent.pop_front();
        }
        self.recent.push_back((offset, end, run));
        run
    }
}

/// A write passing around the cache to its backing device (write-around), in flight.
pub(crate) struct Bypass {
    pub dev: u8,
    pub start: u64,
    pub end: u64,
}

/// Most lines whose read misses are counted for `read_promote_threshold` > 1; the
/// table is cleared when full.
pub(crate) const MISS_TABLE_MAX: usize = 1 << 16;

/// A backing device whose writeback fails (kept until a batch succeeds).
#[derive(Clone, Debug)]
pub(crate) struct BackingFailure {
    pub since: Instant,
    pub since_wall: std::time::SystemTime,
    pub error: Arc<Error>,
}

/// The cleaner's counters (part of [`State`]; the cleaner is `clean.rs`).
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct CleanState {
    /// Lines moved to the head of the log.
    pub moved_lines: u64,
    /// Line copies written back to backing devices (by writeback or for the cleaner).
    pub written_back_lines: u64,
    /// Bytes the cleaner read from the cache device (headers and live lines).
    pub bytes_read: u64,
    /// The last plan found the tail segment movable: space can come without the
    /// backing devices (a writer waiting for space is not refused for a failed one).
    pub tail_movable: bool,
}

impl State {
    /// The end of the log: every line written so far (the open segment's only if it has
    /// lines).
    pub(crate) fn last_written_pos(&self) -> Pos {
        match &self.open {
            Some(o) if !o.entries.is_empty() => Pos {
                id: o.id,
                lines: o.entries.len() as u32,
            },
            Some(o) => Pos::all(o.id - 1),
            None => Pos::all(self.next_id - 1),
        }
    }

    /// How far the log is durable: every segment up to `flushed_id`, and the appended
    /// lines of the one after it.
    pub(crate) fn durable_pos(&self) -> Pos {
        Pos::all(self.flushed_id).max(self.partial)
    }

    /// The durable point a header or superblock may claim: `flushed_id`, but never the
    /// segment recovery took at an uncertain header (`unclaimed`).
    pub(crate) fn durable_claim(&self) -> u64 {
        if self.unclaimed > 0 && self.flushed_id == self.unclaimed {
            self.flushed_id - 1
        } else {
            self.flushed_id
        }
    }

    /// The share of the ring, in percent, holding data not yet written back: segments
    /// after `wb_id` up to `flushed_id`, except those whose live lines are all clean
    /// copies (nothing of them needs the backing devices). Stale-only segments count,
    /// as they always did.
    pub(crate) fn dirty_log_pct(&self, nr_segments: u64, threshold: u64) -> u64 {
        let all = self.flushed_id.saturating_sub(self.wb_id);
        // The exact count walks the per-segment counts: only when it can matter.
        if all * 100 / nr_segments <= threshold {
            return all * 100 / nr_segments;
        }
        let clean_only = self
            .index
            .segments()
            .filter(|&(id, n)| {
                id > self.wb_id && id <= self.flushed_id && n.clean > 0 && n.dirty_live() == 0
            })
            .count() as u64;
        (all - clean_only.min(all)) * 100 / nr_segments
    }

    /// Counts one line access (see [`crate::stats::counter_index`]) for the cache and
    /// for backing device `dev`.
    pub(crate) fn count(&mut self, dev: u8, counter: usize) {
        self.counters[counter] += 1;
        if let Some(b) = self.backing.get_mut(dev as usize).and_then(|b| b.as_mut()) {
            b.counters[counter] += 1;
        }
    }

    /// Whether a write going around the cache overlaps bytes `offset..offset + len`
    /// of device `dev`.
    pub(crate) fn bypass_overlaps(&self, dev: u8, offset: u64, len: u64) -> bool {
        let end = offset.saturating_add(len);
        self.bypassing
            .iter()
            .any(|b| b.dev == dev && b.start < end && offset < b.end)
    }

    /// The refusal for a write to backing device `dev` when writeback to it has failed
    /// for longer than `writeback_fail_timeout_s`.
    pub(crate) fn backing_refusal(&self, dev: u8) -> Option<Error> {
        let timeout = Duration::from_secs(self.tunables.writeback_fail_timeout_s as u64);
        let f = self.backing.get(dev as usize)?.as_ref()?.failing.as_ref()?;
        (f.since.elapsed() >= timeout).then(|| Error::BackingFailed {
            dev,
            secs: f.since.elapsed().as_secs(),
            source: f.error.clone(),
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
        if let Some(e) = self.log_blocked() {
            return Some(e);
        }
        if self.clean.tail_movable {
            // The cleaner frees the tail without the backing devices.
            return None;
        }
        self.any_backing_refusal()
    }

    /// Writeback stopped before a damaged segment kept as evidence, for good: not
    /// while the checkpoint thread is about to record the loss (milliseconds), unless
    /// that cannot be done (format 1, lines unknown, a record that failed).
    pub(crate) fn log_blocked(&self) -> Option<Error> {
        let limit = self.damage.writeback_limit(self.flushed_id);
        let recordable =
            self.damage.records && self.damage.unknown_upto == 0 && !self.record_failed;
        (limit <= self.wb_id && !recordable).then(|| Error::LogBlocked { segment: limit + 1 })
    }

    /// [`State::backing_refusal`] of the first device that has one.
    pub(crate) fn any_backing_refusal(&self) -> Option<Error> {
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
    /// Format 2: the buffer the last append or staging copied its lines into, for the
    /// next one (one segment's size, allocated at the first; outside `ram_buffers`).
    pub append_buf: Option<AlignedBuf>,
    pub ram_buffers: usize,
    /// crc of the header of segment `written_id`, the newest the flusher encoded and
    /// wrote (or recovery read): the next header's `prev_crc`.
    pub prev_crc: u32,
    /// A checkpoint waiting for the header crc of this segment (sealed, not yet
    /// encoded when it looked), and that crc once the flusher wrote the segment.
    pub cp_crc_want: Option<u64>,
    pub cp_crc_got: Option<u32>,
    /// Highest sealed segment id whose write has started.
    pub write_started_id: u64,
    /// Highest segment id whose slot has been written to (a sealed segment's write or
    /// an append): a line read from a slot this overwrote is stale.
    pub slot_claimed_id: u64,
    /// Format 2: the newest append made durable (lines of the open segment, or of a
    /// sealed one not yet written whole).
    pub partial: Pos,
    /// Highest segment id written to the cache device (maybe not yet flushed).
    pub written_id: u64,
    /// When `written_id` first got ahead of `flushed_id`.
    pub unflushed_since: Option<Instant>,
    /// The highest point a caller waits to be durable.
    pub durable_req: Pos,
    pub flushed_id: u64,
    pub wb_id: u64,
    /// The header crc the successor of each segment after the writeback point chains to
    /// (its `prev_crc`), by segment id; and that crc for `wb_id` itself, when known: a
    /// superblock commit records it (`last_writeback_crc`).
    pub chain: BTreeMap<u64, u32>,
    pub wb_crc: Option<u32>,
    /// The sequence number of the last superblock commit started; of the last one
    /// written and flushed; the last one that failed, with its error.
    pub sb_seq: u64,
    pub sb_committed: u64,
    pub sb_failed: Option<(u64, Arc<Error>)>,
    /// Earliest pending flush request and the highest point it waits for.
    pub flush_req: Option<(Instant, Pos)>,
    pub seal_requested: bool,
    pub need_space: bool,
    pub drains: u32,
    /// Callers currently inside [`Cache::write`]: a flush waits the barrier deadline for
    /// more lines only when some other write could join the segment.
    pub active_writers: u32,
    /// The flusher is waiting for work (its condition-variable wait).
    pub flusher_idle: bool,
    /// A caller of `wait_durable` is appending the open segment itself
    /// (`flush::append_here`): the flusher does nothing until it is done.
    pub caller_io: bool,
    /// Appends done by callers of `wait_durable` (of `appends`).
    pub caller_appends: u64,
    pub commit_requested: bool,
    pub tunables: Tunables,
    pub counters: Counters,
    pub cache_bytes_written: u64,
    pub backing_bytes_written: u64,
    /// Lines promoted into the cache on read misses (clean copies).
    pub promoted_lines: u64,
    /// Read misses per line key, while `read_promote_threshold` > 1 (bounded by
    /// [`MISS_TABLE_MAX`]).
    pub misses: std::collections::HashMap<u64, u32>,
    /// Discards passing to backing devices now: no promotion is inserted meanwhile.
    pub discards: u32,
    /// Writes going around the cache now (write-around): no promotion is inserted
    /// meanwhile, and no cached write or discard overlapping one starts.
    pub bypassing: Vec<Bypass>,
    /// Bytes written around the cache (all devices).
    pub bypassed_bytes: u64,
    pub partial_segments: u64,
    /// Appends: flushes that made an open segment's lines durable without sealing it.
    pub appends: u64,
    /// When the newest append was made (the flusher stages lines while appends come).
    pub last_append: Option<Instant>,
    /// Lines written to an open segment's slot ahead of its append (`flush.rs`).
    pub staged_lines: u64,
    /// Time appends spent writing, flushing, and holding the lock while preparing
    /// their writes (microseconds).
    pub append_write_us: u64,
    pub append_flush_us: u64,
    pub append_locked_us: u64,
    /// Why the cache stopped accepting writes.
    pub failed: Option<Failure>,
    /// Damaged log segments and the data lost with them (see `damage.rs`).
    pub damage: Damage,
    /// The crc of every line on the cache device that reads check (`linecrc.rs`).
    pub line_crcs: crate::linecrc::LineCrcs,
    /// Line copies (and segment headers) found rotten on the cache device since open.
    pub rotten_found: u64,
    /// Segments recovery took at an older append than their newest header (whose
    /// lines failed their checks): id -> the generation the index was built from.
    pub recovered_gens: BTreeMap<u64, u16>,
    /// A segment recovery took at a header that may not be its final one: no claim
    /// (header `durable`, superblock `durable_id`) covers it until a later segment is
    /// durable (0: none).
    pub unclaimed: u64,
    pub stop_flush: bool,
    /// The flusher has exited (the cache is closing): nothing more becomes durable.
    pub flusher_exited: bool,
    pub stop_writeback: bool,
    /// The cleaner's counters (`clean.rs`).
    pub clean: CleanState,
    /// Checkpoints (format 2): the newest sequence number whose area header is valid
    /// on the device (the next one is written into the other area), the last segment
    /// the newest written or loaded checkpoint covers, checkpoints written, and
    /// whether one is being written.
    pub cp_seq: u64,
    pub cp_upto: u64,
    pub checkpoints: u64,
    pub cp_busy: bool,
    /// Segments whose header writeback found unreadable while serving, with the end of
    /// the log then: passed unread once that is durable (`writeback.rs`).
    pub unreadable: BTreeMap<u64, Pos>,
    pub stop_checkpoint: bool,
    /// The last checkpoint written to record a loss failed: writes blocked behind the
    /// damage fail instead of waiting for it.
    pub record_failed: bool,
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
    pub recovered_gens: BTreeMap<u64, u16>,
    pub ambiguous: bool,
    pub cp_seq: u64,
    pub cp_upto: u64,
    pub chain: BTreeMap<u64, u32>,
    pub wb_crc: Option<u32>,
    /// The line crcs recovery found (`linecrc.rs`).
    pub line_crcs: crate::linecrc::LineCrcs,
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
            append_buf: None,
            pool: (0..ram_buffers)
                .map(|_| AlignedBuf::new(geo.segment_size as usize))
                .collect(),
            ram_buffers,
            prev_crc: r.last_crc,
            cp_crc_want: None,
            cp_crc_got: None,
            write_started_id: r.last_id,
            slot_claimed_id: r.last_id,
            partial: Pos::default(),
            written_id: r.last_id,
            unflushed_since: None,
            durable_req: Pos::default(),
            flushed_id: r.last_id,
            wb_id: r.wb_id,
            chain: r.chain,
            wb_crc: r.wb_crc,
            sb_seq: r.sb_seq,
            sb_committed: r.sb_seq,
            sb_failed: None,
            flush_req: None,
            seal_requested: false,
            need_space: false,
            drains: 0,
            active_writers: 0,
            flusher_idle: false,
            caller_io: false,
            caller_appends: 0,
            commit_requested: false,
            tunables,
            counters: [0; 16],
            cache_bytes_written: 0,
            backing_bytes_written: 0,
            promoted_lines: 0,
            misses: Default::default(),
            discards: 0,
            bypassing: Vec::new(),
            bypassed_bytes: 0,
            partial_segments: 0,
            appends: 0,
            last_append: None,
            staged_lines: 0,
            append_write_us: 0,
            append_flush_us: 0,
            append_locked_us: 0,
            failed: None,
            damage: r.damage,
            line_crcs: r.line_crcs,
            rotten_found: 0,
            recovered_gens: r.recovered_gens,
            unclaimed: if r.ambiguous { r.last_id } else { 0 },
            stop_flush: false,
            flusher_exited: false,
            stop_writeback: false,
            clean: Default::default(),
            cp_seq: r.cp_seq,
            cp_upto: r.cp_upto,
            checkpoints: 0,
            cp_busy: false,
            unreadable: BTreeMap::new(),
            stop_checkpoint: false,
            record_failed: false,
        }
    }
}

/// Format 2: how long after an append the flusher keeps staging the open segment's
/// lines (see `flush.rs`); a writer that fills `stage_lines` within it wakes the flusher.
pub(crate) const STAGE_WINDOW: Duration = Duration::from_secs(1);

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
    /// The thread an append's line write goes to (`lc-append-io`).
    pub side: crate::sidewrite::SideWriter,
}

impl Inner {
    /// After a line was added to the open segment: while flushes come often, wakes the
    /// flusher to stage the lines once `stage_lines` of them have accumulated.
    pub(crate) fn kick_stager(&self, st: &State) {
        let Some(o) = st.open.as_ref() else { return };
        if o.entries.len() - o.staged == st.tunables.stage_lines as usize
            && st
                .last_append
                .is_some_and(|t| Instant::now() < t + STAGE_WINDOW)
        {
            self.worker_cv.notify_all();
        }
    }

    /// Flushes every backing device changed outside writeback (discards, writes around
    /// the cache) since its last flush: on return, every change issued to it before
    /// this call is durable there (`changes_flushed`), and read misses of it are
    /// promoted again. Threads do not rely on each other's flushes: a flush another
    /// thread has started may not have reached the device yet, so a device with changes
    /// not yet known flushed is flushed here again. A failed flush leaves them unflushed.
    pub(crate) fn flush_backing(&self) -> Result<()> {
        let devs: Vec<(usize, Arc<dyn BlockDevice>, u64)> = {
            let st = self.lock();
            st.backing
                .iter()
                .enumerate()
                .filter_map(|(id, b)| b.as_ref().map(|b| (id, b)))
                .filter(|(_, b)| b.changes_issued > b.changes_flushed)
                .map(|(id, b)| (id, b.dev.clone(), b.changes_issued))
                .collect()
        };
        for (id, d, issued) in devs {
            d.flush().map_err(|e| Error::io(&d.describe(), 0, e))?;
            // The same device still (not detached and another attached meanwhile).
            if let Some(b) = self.lock().backing[id].as_mut() {
                if Arc::ptr_eq(&b.dev, &d) {
                    b.changes_flushed = b.changes_flushed.max(issued);
                }
            }
        }
        Ok(())
    }

    /// Whether a backing device has changes (discards, writes around the cache) not
    /// yet flushed: the writeback thread flushes them when idle.
    pub(crate) fn backing_unsettled(st: &State) -> bool {
        st.backing
            .iter()
            .flatten()
            .any(|b| b.changes_issued > b.changes_flushed)
    }

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

    /// The cache device failed (`e`): the cache stops accepting writes, and everyone
    /// waiting wakes to see it.
    pub(crate) fn fail(&self, st: &mut State, e: Error) {
        st.failed = Some(e.into());
        self.io_cv.notify_all();
        self.worker_cv.notify_all();
    }

    /// Makes sure an open segment with a free line exists, sealing a full one and
    /// taking a buffer from the pool. Returns `false` when no buffer is free (all are
    /// sealed and waiting for the flusher); the caller waits on `io_cv` and retries.
    pub(crate) fn ensure_open(&self, st: &mut State) -> bool {
        if let Some(o) = &st.open {
            if o.entries.len() < self.geo.lines_per_segment as usize {
                return true;
            }
            self.seal(st);
        }
        if st.next_id > st.flushed_id + SEAL_AHEAD {
            // The format's promise (FORMAT.md): wait for the flusher to catch up.
            self.worker_cv.notify_all();
            return false;
        }
        match st.pool.pop() {
            Some(buf) => {
                let id = st.next_id;
                st.next_id += 1;
                st.open = Some(OpenSeg {
                    id,
                    buf,
                    entries: Vec::with_capacity(self.geo.lines_per_segment as usize),
                    last_write: Instant::now(),
                    written: 0,
                    staged: 0,
                    gen: 0,
                    crc: 0,
                    hcrc: 0,
                });
                true
            }
            None => {
                self.worker_cv.notify_all();
                false
            }
        }
    }

    /// Waits until the log up to `target` is on the cache device and the cache device
    /// was flushed.
    pub(crate) fn wait_durable(&self, target: Pos) -> Result<()> {
        let mut st = self.lock();
        loop {
            if st.durable_pos() >= target {
                return Ok(());
            }
            if let Some(f) = &st.failed {
                return Err(Error::Failed(f.clone()));
            }
            if st.flusher_exited {
                return Err(Error::Failed(Failure::Closing));
            }
            if let Some(e) = st.stuck_refusal() {
                return Err(e);
            }
            let appended;
            (st, appended) = crate::flush::append_here(self, st, target);
            if appended {
                continue;
            }
            self.request_durable(&mut st, target);
            st = self.wait_io(st, Duration::from_millis(50));
        }
    }

    /// Asks the flusher to make the log up to `target` durable: a flush of what is
    /// written, and for lines of the open segment a flush request (format 2 appends
    /// them, format 1 seals the segment).
    pub(crate) fn request_durable(&self, st: &mut State, target: Pos) {
        st.durable_req = st.durable_req.max(target);
        if st.open.as_ref().is_some_and(|o| o.id <= target.id) {
            st.flush_req = Some(match st.flush_req {
                Some((t, m)) => (t, m.max(target)),
                None => (Instant::now(), target),
            });
        }
        self.worker_cv.notify_all();
    }

    /// Seals the open segment (if it has lines): encodes its final header, moves it to
    /// `ram`. A format-2 segment whose lines were all written by appends needs no new
    /// header: its newest one is final.
    pub(crate) fn seal(&self, st: &mut State) {
        let has_lines = st.open.as_ref().is_some_and(|o| !o.entries.is_empty());
        if !has_lines {
            return;
        }
        let mut o = st.open.take().expect("open segment");
        let geo = &self.geo;
        let (hl, ds) = (geo.header_len(), geo.data_start());
        let (n, written, from) = (o.entries.len(), o.written, o.staged);
        let header = n > written || written == 0;
        let gen = if !geo.appends() {
            0
        } else if header {
            o.gen + 1
        } else {
            o.gen
        };
        let pending = header.then(|| PendingHeader {
            durable: st.durable_claim(),
            crc: o.crc,
            written,
            entries: std::mem::take(&mut o.entries),
        });
        if gen == 1 {
            // The first header of a segment: the other copy goes out as zeros with
            // the lines, so no older header of this slot outlives it.
            o.buf[hl..ds].fill(0);
        }
        if n < geo.lines_per_segment as usize {
            st.partial_segments += 1;
        }
        st.ram.insert(
            o.id,
            Arc::new(Sealed {
                id: o.id,
                buf: o.buf,
                from,
                n,
                gen,
                header: pending,
                hcrc: o.hcrc,
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
                since: b.since,
            });
        }
    }
    v
}
