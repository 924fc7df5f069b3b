//! Counters and the statistics snapshot.

/// dm-lc's 16 counters, indexed by [`counter_index`]: (write?, hit?, on RAM buffer?, full line?).
pub type Counters = [u64; 16];

/// Index into [`Counters`] for one line access.
pub fn counter_index(write: bool, hit: bool, on_ram: bool, full: bool) -> usize {
    (write as usize) << 3 | (hit as usize) << 2 | (on_ram as usize) << 1 | full as usize
}

/// A point-in-time view of a cache.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Per-line access counters, see [`counter_index`].
    pub counters: Counters,
    /// The same counters per attached backing device id.
    pub device_counters: Vec<(u8, Counters)>,
    /// Dirty lines per backing device id (only attached ids).
    pub dirty_lines: Vec<(u8, u64)>,
    /// Highest segment id that is on the cache device and flushed.
    pub last_flushed_id: u64,
    /// Highest segment id written back (and persisted in the superblock).
    pub last_writeback_id: u64,
    /// Id of the segment being filled in RAM.
    pub open_segment_id: u64,
    /// Segment slots in the ring.
    pub nr_segments: u64,
    /// Segments after the writeback point (flushed or in RAM, not yet written back or
    /// cleaned), clean copies of read misses included: 0 means the log holds nothing.
    pub dirty_segments: u64,
    /// Bytes written to the cache device (segments and superblocks).
    pub cache_bytes_written: u64,
    /// Bytes written to backing devices by writeback.
    pub backing_bytes_written: u64,
    /// Lines promoted into the cache on read misses (clean copies; read caching).
    pub promoted_lines: u64,
    /// The same per attached backing device id.
    pub device_promoted_lines: Vec<(u8, u64)>,
    /// Bytes written around the cache to backing devices (write-around of sequential
    /// streams past `sequential_cutoff`).
    pub bypassed_bytes: u64,
    /// The same per attached backing device id.
    pub device_bypassed_bytes: Vec<(u8, u64)>,
    /// Writes that went around the cache, per attached backing device id.
    pub device_bypassed_writes: Vec<(u8, u64)>,
    /// RAM held by segment buffers, the index and the line crcs reads check
    /// against, in bytes.
    pub ram_bytes: u64,
    /// Index bytes alone.
    pub index_bytes: u64,
    /// Live index entries.
    pub index_entries: u64,
    /// Segments sealed before they were full (format 1: every flush; format 2: the
    /// idle timer, a drain, a clean stop).
    pub partial_segments: u64,
    /// Format 2: flushes that made the open segment's lines durable by an append
    /// instead of sealing it.
    pub appends: u64,
    /// Format 2: of `appends`, those done by the thread that waited for them (a flush
    /// or FUA write finding the flusher idle) instead of by the flusher.
    pub caller_appends: u64,
    /// Format 2: lines written to the open segment's slot ahead of the append that made
    /// them durable (staged while flushes come often).
    pub staged_lines: u64,
    /// Format 2: microseconds appends spent writing lines and headers: the lines
    /// written by `lc-append-io` while the append's thread computes their crcs, encodes
    /// the header and writes it (with `append_flush_us` over `appends`: what a flush
    /// waits for on average).
    pub append_write_us: u64,
    /// Format 2: microseconds appends spent flushing the cache device.
    pub append_flush_us: u64,
    /// Format 2: microseconds appends held the engine lock preparing their writes (the
    /// copy of the new lines and of the entries), during which writers wait.
    pub append_locked_us: u64,
    /// Lines of the log the index points at (the newest copy of a cached line).
    pub live_lines: u64,
    /// Lines of the log that a newer copy superseded: space the cleaner can reclaim.
    pub stale_lines: u64,
    /// Lines the cleaner moved to the head of the log (instead of writing them back).
    pub moved_lines: u64,
    /// Line copies found rotten on the cache device since open (by reads, writeback,
    /// the cleaner or a scrub; a segment header that no longer reads counts one),
    /// whether or not they were still needed: media damage to watch.
    pub rotten_found: u64,
    /// Bytes the cleaner read from the cache device to move lines (segment headers,
    /// and live lines alone where the headers hold line checksums).
    pub cleaner_bytes_read: u64,
    /// Line copies written back to the backing devices.
    pub written_back_lines: u64,
    /// Damage recovery found in the log and what of it is still lost; `None` when the
    /// log is intact.
    pub damage: Option<crate::damage::DamageReport>,
    /// Backing devices whose writeback is failing (retried with back-off; their dirty
    /// lines stay in the cache).
    pub writeback_failures: Vec<WritebackFailure>,
}

/// A backing device whose writeback fails.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WritebackFailure {
    /// Backing device id.
    pub dev: u8,
    /// When writeback to it first failed (wall clock).
    pub since: std::time::SystemTime,
    /// The last error.
    pub error: String,
}

/// Names of the 16 counters in [`counter_index`] order, for listings.
pub fn counter_name(i: usize) -> String {
    format!(
        "{}_{}_{}_{}",
        if i & 8 != 0 { "write" } else { "read" },
        if i & 4 != 0 { "hit" } else { "miss" },
        if i & 2 != 0 { "ram" } else { "disk" },
        if i & 1 != 0 { "full" } else { "partial" }
    )
}
