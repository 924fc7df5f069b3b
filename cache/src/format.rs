//! On-disk format (version 2, and version 1 read and written for caches formatted
//! before it): geometry, the superblock and segment headers, with explicit
//! little-endian encoding and crc32c checksums. `docs/FORMAT.md` is the reference for
//! every field; the tests here pin the sizes and offsets it gives.
//!
//! Layout of a cache device (S = segment size):
//! ```text
//! [0, S)              superblock region: copy A at 0, copy B at SB_COPY_SIZE
//! [S*(1+k), S*(2+k))  segment slot k, k in 0..nr_segments
//! ```
//! A segment is `header_copies` headers of `header_blocks` 4 KiB blocks each (two in
//! version 2, written alternately so that appending to a flushed segment never tears
//! the header that made it durable; one in version 1) followed by up to
//! `lines_per_segment` 4 KiB cache lines.

use crate::error::{Error, Result};

/// Bytes per sector: the unit of backing-device addresses and dirty bits.
pub const SECTOR: u64 = 512;
/// Bytes per cache line.
pub const LINE: u64 = 4096;
/// Sectors per cache line (one dirty bit each).
pub const SECTORS_PER_LINE: u64 = LINE / SECTOR;
/// All dirty bits set.
pub const FULL_LINE: u8 = 0xff;
/// The on-disk format version `lc format` writes.
pub const FORMAT_VERSION: u32 = 2;
/// The oldest format version this build still opens, serves and writes back.
pub const OLDEST_VERSION: u32 = 1;
/// Superblock magic.
pub const SB_MAGIC: [u8; 8] = *b"lcCACHE\0";
/// Segment header magic.
pub const SEG_MAGIC: [u8; 8] = *b"lcSEGHD\0";
/// Bytes of one superblock copy.
pub const SB_COPY_SIZE: usize = 16384;
/// Entries in the backing-device table (device ids 0..=254).
pub const MAX_BACKING: usize = 255;
/// Smallest and largest segment sizes.
pub const MIN_SEGMENT: u32 = 64 << 10;
/// Largest segment size.
pub const MAX_SEGMENT: u32 = 4 << 20;
/// Fixed part of a segment header, before the entries.
pub const SEG_FIXED: usize = 64;
/// A segment is opened (given its id) only while `id <= durable + SEAL_AHEAD`, where
/// `durable` is the newest durable segment id. Recovery relies on it: if segment `n`
/// was durable and the log went on, a segment in `n+1 ..= n + 2*SEAL_AHEAD` says so.
pub const SEAL_AHEAD: u64 = 2048;
/// Checkpoint area magic.
pub const CP_MAGIC: [u8; 8] = *b"lcCKPT\0\0";
/// Bytes of a checkpoint area's header; the entries follow it.
pub const CP_HEADER: usize = 4096;
/// Bytes per checkpoint entry.
pub const CP_ENTRY: usize = 16;
/// Bytes per segment-header entry.
pub const ENTRY_SIZE: usize = 16;
/// Entry flag: the line is a discard record (tombstone) with no data.
pub const ENTRY_TOMBSTONE: u8 = 1;
/// Entry flag: the line is a clean copy (a full line identical to the backing device,
/// promoted on a read miss; never written back); its `dirty` is [`FULL_LINE`].
pub const ENTRY_CLEAN: u8 = 2;

const SB_TABLE_OFF: usize = 128;
const SB_ENTRY_SIZE: usize = 48;
const SB_LABEL_LEN: usize = 32;
const SB_CRC_OFF: usize = SB_COPY_SIZE - 4;

/// crc32c of `data`.
pub fn crc(data: &[u8]) -> u32 {
    crc32c::crc32c(data)
}

/// The crc32c of `a` followed by one line whose crc32c is `line`, from `crc(a)` alone:
/// `crc(a ‖ b) = Z(crc(a)) ^ crc(b)`, with `Z` the linear map "append 4096 zero bytes"
/// over GF(2). `Z` is tabulated once (from the crate's general combine, which squares
/// matrices per call), so extending a data crc by a line costs four lookups.
pub fn crc_extend_line(a: u32, line: u32) -> u32 {
    static TABLE: std::sync::OnceLock<[[u32; 256]; 4]> = std::sync::OnceLock::new();
    let t = TABLE.get_or_init(|| {
        let col: Vec<u32> = (0..32)
            .map(|bit| crc32c::crc32c_combine(1 << bit, 0, LINE as usize))
            .collect();
        let mut t = [[0u32; 256]; 4];
        for (byte, tb) in t.iter_mut().enumerate() {
            for (v, out) in tb.iter_mut().enumerate() {
                *out = (0..8)
                    .filter(|k| v & (1 << k) != 0)
                    .fold(0, |x, k| x ^ col[byte * 8 + k]);
            }
        }
        t
    });
    let b = a.to_le_bytes();
    t[0][b[0] as usize] ^ t[1][b[1] as usize] ^ t[2][b[2] as usize] ^ t[3][b[3] as usize] ^ line
}

/// Records the crc of each line of `entries` (their bytes `lines`, 4096 each, in
/// order) and returns `crc` (the data crc of the lines before them) extended over them.
pub fn seal_lines(mut crc: u32, entries: &mut [Entry], lines: &[u8]) -> u32 {
    debug_assert_eq!(lines.len(), entries.len() * LINE as usize);
    for (e, l) in entries.iter_mut().zip(lines.chunks_exact(LINE as usize)) {
        let c = crc32c::crc32c(l);
        e.crc = Some(c);
        crc = crc_extend_line(crc, c);
    }
    crc
}

fn le_u32(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().expect("4 bytes"))
}

fn le_u64(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().expect("8 bytes"))
}

fn put_u32(b: &mut [u8], off: usize, v: u32) {
    b[off..off + 4].copy_from_slice(&v.to_le_bytes());
}

fn put_u64(b: &mut [u8], off: usize, v: u64) {
    b[off..off + 8].copy_from_slice(&v.to_le_bytes());
}

/// The fixed shape of a formatted cache device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    /// Format version: 2 (two header copies, appends to a flushed segment) or 1.
    pub version: u32,
    /// Logical block size exposed to users: 512 or 4096.
    pub block_size: u32,
    /// Segment size in bytes: a power of two in [`MIN_SEGMENT`, `MAX_SEGMENT`].
    pub segment_size: u32,
    /// Number of segment slots in the ring.
    pub nr_segments: u64,
    /// 4 KiB blocks taken by a segment header.
    pub header_blocks: u32,
    /// Cache lines per segment.
    pub lines_per_segment: u32,
}

impl Geometry {
    /// Computes the geometry of the current format version for a device of
    /// `device_size` bytes, validating the inputs.
    pub fn new(block_size: u32, segment_size: u32, device_size: u64) -> Result<Self> {
        Self::with_version(FORMAT_VERSION, block_size, segment_size, device_size)
    }

    /// Computes the geometry of format `version` (1 or 2).
    pub fn with_version(
        version: u32,
        block_size: u32,
        segment_size: u32,
        device_size: u64,
    ) -> Result<Self> {
        if !(OLDEST_VERSION..=FORMAT_VERSION).contains(&version) {
            return Err(Error::Invalid(format!("format version {version}")));
        }
        let copies = if version == 1 { 1 } else { 2 };
        if block_size != 512 && block_size != 4096 {
            return Err(Error::Invalid(format!(
                "block size {block_size}: must be 512 or 4096"
            )));
        }
        if !segment_size.is_power_of_two() || !(MIN_SEGMENT..=MAX_SEGMENT).contains(&segment_size) {
            return Err(Error::Invalid(format!(
                "segment size {segment_size}: must be a power of two from 64 KiB to 4 MiB"
            )));
        }
        let blocks = segment_size / LINE as u32;
        let mut header_blocks = 1;
        while SEG_FIXED + (blocks - copies * header_blocks) as usize * ENTRY_SIZE + 4
            > header_blocks as usize * LINE as usize
        {
            header_blocks += 1;
        }
        let slots = device_size / segment_size as u64;
        if slots < 3 {
            return Err(Error::Invalid(format!(
                "device of {device_size} bytes too small: need at least 3 segments of {segment_size} bytes"
            )));
        }
        let mut g = Geometry {
            version,
            block_size,
            segment_size,
            nr_segments: slots - 1,
            header_blocks,
            lines_per_segment: blocks - copies * header_blocks,
        };
        // Format 2: the two checkpoint areas after the ring take what they need: the
        // largest segment count that fits (`device_bytes` grows with it), or 2. A binary
        // search, not a walk down one segment at a time, which takes minutes for a size
        // read from a damaged superblock.
        let fits = |n: u64| {
            Geometry {
                nr_segments: n,
                ..g
            }
            .checked_device_bytes()
            .is_some_and(|b| b <= device_size)
        };
        if g.nr_segments > 2 && !fits(g.nr_segments) {
            // Every count from `hi` on is too many; `lo` fits, or is the floor 2.
            let (mut lo, mut hi) = (2, g.nr_segments);
            while hi - lo > 1 {
                let mid = lo + (hi - lo) / 2;
                if fits(mid) {
                    lo = mid;
                } else {
                    hi = mid;
                }
            }
            g.nr_segments = lo;
        }
        match g.checked_device_bytes() {
            Some(b) if b <= device_size => Ok(g),
            Some(b) => Err(Error::Invalid(format!(
                "device of {device_size} bytes too small: need {b} bytes for segments of {segment_size} bytes"
            ))),
            None => Err(Error::Invalid(format!(
                "device of {device_size} bytes: its layout overflows 64-bit offsets"
            ))),
        }
    }

    /// Bytes of one checkpoint area (format 2; 0 in format 1): the header and one
    /// entry per line of the ring, rounded up to 4 KiB.
    pub fn checkpoint_area_bytes(&self) -> u64 {
        if self.version == 1 {
            return 0;
        }
        let raw = CP_HEADER as u64 + CP_ENTRY as u64 * self.total_lines();
        raw.div_ceil(LINE) * LINE
    }

    /// Byte offset of checkpoint area `area` (0 = A, 1 = B): after the ring.
    pub fn checkpoint_offset(&self, area: u64) -> u64 {
        self.segment_size as u64 * (1 + self.nr_segments) + area * self.checkpoint_area_bytes()
    }

    /// Bytes of the device this geometry uses: the superblock region, the ring and
    /// (format 2) the checkpoint areas.
    pub fn device_bytes(&self) -> u64 {
        self.checkpoint_offset(2)
    }

    /// [`Geometry::device_bytes`], or `None` where it would overflow a u64 (a segment
    /// count no device has, e.g. read from a damaged superblock).
    fn checked_device_bytes(&self) -> Option<u64> {
        let area = if self.version == 1 {
            0
        } else {
            (CP_ENTRY as u64)
                .checked_mul(
                    self.nr_segments
                        .checked_mul(self.lines_per_segment as u64)?,
                )?
                .checked_add(CP_HEADER as u64)?
                .div_ceil(LINE)
                .checked_mul(LINE)?
        };
        (self.segment_size as u64)
            .checked_mul(self.nr_segments.checked_add(1)?)?
            .checked_add(area.checked_mul(2)?)
    }

    /// Header length in bytes (one copy).
    pub fn header_len(&self) -> usize {
        self.header_blocks as usize * LINE as usize
    }

    /// Header copies per segment: 2 in format 2, 1 in format 1.
    pub fn header_copies(&self) -> usize {
        if self.version == 1 {
            1
        } else {
            2
        }
    }

    /// True when a flush may append to a segment already written (format 2).
    pub fn appends(&self) -> bool {
        self.version >= 2
    }

    /// Offset of the first line within a segment: after every header copy.
    pub fn data_start(&self) -> usize {
        self.header_copies() * self.header_len()
    }

    /// The header copy that append number `gen` of a segment writes (format 2:
    /// 1 → copy 0, 2 → copy 1, 3 → copy 0, ...; format 1: always copy 0).
    pub fn header_copy(&self, gen: u16) -> usize {
        (gen.max(1) as usize - 1) % self.header_copies()
    }

    /// Byte offset of segment `id` (ids start at 1) on the cache device.
    pub fn segment_offset(&self, id: u64) -> u64 {
        let slot = (id - 1) % self.nr_segments;
        self.segment_size as u64 * (1 + slot)
    }

    /// Byte offset of line `slot` of segment `id`.
    pub fn line_offset(&self, id: u64, slot: u32) -> u64 {
        self.segment_offset(id) + self.data_start() as u64 + slot as u64 * LINE
    }

    /// The lap of segment `id`: how many times the ring has been walked when it is written.
    pub fn lap(&self, id: u64) -> u64 {
        (id - 1) / self.nr_segments + 1
    }

    /// Cache capacity in lines.
    pub fn total_lines(&self) -> u64 {
        self.nr_segments * self.lines_per_segment as u64
    }
}

/// One row of the superblock's backing-device table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackingRecord {
    /// Size of the backing device in bytes when it was attached.
    pub size: u64,
    /// A label identifying it (up to 32 bytes of UTF-8, e.g. a LUN name).
    pub label: String,
    /// The first segment id that may hold its lines: a line of this id in an older
    /// segment belongs to a device detached before this one was attached, and is
    /// dropped at open. 0: any (superblocks of earlier lc versions). At most
    /// [`MAX_SINCE`] (48 bits on the device).
    pub since: u64,
}

/// The largest `since` a backing-table entry holds (its 6 bytes).
pub const MAX_SINCE: u64 = (1 << 48) - 1;

/// The superblock (both copies hold the same fields; the newer valid `seq` wins).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Superblock {
    /// Geometry fixed at format time.
    pub geometry: Geometry,
    /// Random id of this formatted cache; segment headers carry it too.
    pub uuid: [u8; 16],
    /// Commit sequence number; copy `seq % 2` is written.
    pub seq: u64,
    /// Every segment with an id at or below this has been written back.
    pub last_writeback_id: u64,
    /// Every segment with an id at or below this was durable when this copy was
    /// written (0: not recorded). Recovery takes it as proof, like a header's
    /// `durable`.
    pub durable_id: u64,
    /// The header crc segment `last_writeback_id + 1` chains to (its `prev_crc`), when
    /// known: recovery takes no segment there that does not, so a segment left in its
    /// slot from before an earlier torn tail is never replayed. `None`: not recorded
    /// (older versions, or the engine did not know it), and not checked.
    pub last_writeback_crc: Option<u32>,
    /// Backing-device table indexed by device id.
    pub backing: Vec<Option<BackingRecord>>,
}

impl Superblock {
    /// Byte offset of the copy that commit number `seq` writes.
    pub fn copy_offset(seq: u64) -> u64 {
        (seq % 2) * SB_COPY_SIZE as u64
    }

    /// Encodes one superblock copy.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; SB_COPY_SIZE];
        b[0..8].copy_from_slice(&SB_MAGIC);
        put_u32(&mut b, 8, self.geometry.version);
        put_u32(&mut b, 12, self.geometry.block_size);
        put_u32(&mut b, 16, self.geometry.segment_size);
        put_u32(&mut b, 20, self.geometry.header_blocks);
        put_u32(&mut b, 24, self.geometry.lines_per_segment);
        put_u64(&mut b, 32, self.geometry.nr_segments);
        b[40..56].copy_from_slice(&self.uuid);
        put_u64(&mut b, 56, self.seq);
        put_u64(&mut b, 64, self.last_writeback_id);
        put_u64(&mut b, 72, self.durable_id);
        if let Some(c) = self.last_writeback_crc {
            put_u32(&mut b, 80, c);
            b[84] = 1;
        }
        for (id, rec) in self.backing.iter().enumerate().take(MAX_BACKING) {
            if let Some(rec) = rec {
                let off = SB_TABLE_OFF + id * SB_ENTRY_SIZE;
                b[off] = id as u8;
                b[off + 1] = 1;
                b[off + 2..off + 8].copy_from_slice(&rec.since.min(MAX_SINCE).to_le_bytes()[..6]);
                put_u64(&mut b, off + 8, rec.size);
                let label = rec.label.as_bytes();
                let n = label.len().min(SB_LABEL_LEN);
                b[off + 16..off + 16 + n].copy_from_slice(&label[..n]);
            }
        }
        let c = crc(&b[..SB_CRC_OFF]);
        put_u32(&mut b, SB_CRC_OFF, c);
        b
    }

    /// Decodes one copy. `device` names the cache device in errors.
    pub fn decode(b: &[u8], device: &str) -> Result<Self> {
        let bad = |reason: String| Error::BadFormat {
            device: device.to_string(),
            reason,
        };
        if b.len() < SB_COPY_SIZE {
            return Err(bad("superblock truncated".into()));
        }
        if b[0..8] != SB_MAGIC {
            return Err(bad(
                "no lc superblock (bad magic): not an lc cache device, or not formatted".into(),
            ));
        }
        if le_u32(b, SB_CRC_OFF) != crc(&b[..SB_CRC_OFF]) {
            return Err(bad("superblock checksum mismatch".into()));
        }
        let version = le_u32(b, 8);
        if !(OLDEST_VERSION..=FORMAT_VERSION).contains(&version) {
            return Err(Error::Version {
                device: device.to_string(),
                version,
            });
        }
        let geometry = Geometry {
            version,
            block_size: le_u32(b, 12),
            segment_size: le_u32(b, 16),
            header_blocks: le_u32(b, 20),
            lines_per_segment: le_u32(b, 24),
            nr_segments: le_u64(b, 32),
        };
        // The fields are untrusted: sizes that overflow a u64 (which the recomputation
        // below would compute with) describe no device.
        let fits = || {
            let ring =
                (geometry.segment_size as u64).checked_mul(geometry.nr_segments.checked_add(1)?)?;
            let lines = geometry
                .nr_segments
                .checked_mul(geometry.lines_per_segment as u64)?;
            let area = (CP_ENTRY as u64)
                .checked_mul(lines)?
                .checked_add(CP_HEADER as u64 + LINE)?;
            ring.checked_add(area.checked_mul(2)?)
        };
        if fits().is_none() {
            return Err(bad(
                "superblock geometry invalid: larger than any device".into()
            ));
        }
        // Recompute from first principles: a superblock must describe a geometry we make.
        let expect = Geometry::with_version(
            version,
            geometry.block_size,
            geometry.segment_size,
            geometry.device_bytes(),
        )
        .map_err(|e| bad(format!("superblock geometry invalid: {e}")))?;
        if expect != geometry {
            return Err(bad("superblock geometry inconsistent".into()));
        }
        let mut uuid = [0u8; 16];
        uuid.copy_from_slice(&b[40..56]);
        let mut backing = vec![None; MAX_BACKING];
        for (id, slot) in backing.iter_mut().enumerate() {
            let off = SB_TABLE_OFF + id * SB_ENTRY_SIZE;
            if b[off + 1] == 1 {
                let raw = &b[off + 16..off + 16 + SB_LABEL_LEN];
                let end = raw.iter().position(|&c| c == 0).unwrap_or(SB_LABEL_LEN);
                let mut since = [0u8; 8];
                since[..6].copy_from_slice(&b[off + 2..off + 8]);
                *slot = Some(BackingRecord {
                    size: le_u64(b, off + 8),
                    label: String::from_utf8_lossy(&raw[..end]).into_owned(),
                    since: u64::from_le_bytes(since),
                });
            }
        }
        Ok(Superblock {
            geometry,
            uuid,
            seq: le_u64(b, 56),
            last_writeback_id: le_u64(b, 64),
            durable_id: le_u64(b, 72),
            last_writeback_crc: (b[84] == 1).then(|| le_u32(b, 80)),
            backing,
        })
    }
}

/// One cache line's record in a segment header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry {
    /// Backing sector (512-byte units) of the line's first sector; a multiple of 8.
    pub sector: u64,
    /// Backing device id.
    pub dev: u8,
    /// One bit per sector of the line that holds dirty data.
    pub dirty: u8,
    /// [`ENTRY_TOMBSTONE`], [`ENTRY_CLEAN`] or 0.
    pub flags: u8,
    /// crc32c of the line's 4096 bytes, when recorded (written by every header since
    /// line checksums exist; `None` in older headers, and for lines whose header is
    /// not encoded yet). Lets the cleaner read and check a line without its segment.
    pub crc: Option<u32>,
}

impl Entry {
    /// True for a discard record.
    pub fn is_tombstone(&self) -> bool {
        self.flags & ENTRY_TOMBSTONE != 0
    }

    /// True for a clean copy.
    pub fn is_clean(&self) -> bool {
        self.flags & ENTRY_CLEAN != 0
    }

    /// The index key of the line this entry is a copy of.
    pub fn line_key(&self) -> u64 {
        crate::index::key(self.dev, self.sector / SECTORS_PER_LINE)
    }
}

/// A segment header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SegmentHeader {
    /// Global segment id (1, 2, ...).
    pub id: u64,
    /// Lap of the ring; must equal `geometry.lap(id)`.
    pub lap: u64,
    /// Format 2: the append number of this header within its segment (1, 2, ...;
    /// append `gen` writes header copy `(gen - 1) mod 2`). Format 1: 0.
    pub gen: u16,
    /// Random per-open nonce of the session that wrote the segment.
    pub nonce: u64,
    /// crc32c of the previous segment's header (0 for the first after a clean ring).
    pub prev_crc: u32,
    /// Newest segment id that was durable (written and the cache device flushed) when
    /// this header was sealed; 0 when not recorded. Stored as `durable_back`, the
    /// distance back from `id` (see [`SegmentHeader::encode_into`]).
    pub durable: u64,
    /// crc32c of the used lines' data, `entries.len() * 4096` bytes.
    pub data_crc: u32,
    /// Cache uuid.
    pub uuid: [u8; 16],
    /// The used lines, in slot order.
    pub entries: Vec<Entry>,
}

impl SegmentHeader {
    /// Encodes into `out` (exactly `geometry.header_len()` bytes); returns the header crc.
    pub fn encode_into(&self, out: &mut [u8]) -> u32 {
        out.fill(0);
        out[0..8].copy_from_slice(&SEG_MAGIC);
        // durable_back: 0 means "not recorded"; a distance too large for u32 is stored
        // as u32::MAX, which claims an older (still true) durable point.
        let back = self.id.saturating_sub(self.durable).min(u32::MAX as u64) as u32;
        put_u32(out, 8, if self.durable == 0 { 0 } else { back.max(1) });
        put_u32(out, 12, self.entries.len() as u32);
        put_u64(out, 16, self.id);
        // Format 1 stored the lap as a u64; laps stay far below 2^32, so its upper half
        // (now gen and a reserved u16) was always zero.
        put_u32(out, 24, self.lap as u32);
        out[28..30].copy_from_slice(&self.gen.to_le_bytes());
        put_u64(out, 32, self.nonce);
        put_u32(out, 40, self.prev_crc);
        put_u32(out, 44, self.data_crc);
        out[48..64].copy_from_slice(&self.uuid);
        for (i, e) in self.entries.iter().enumerate() {
            let off = SEG_FIXED + i * ENTRY_SIZE;
            put_u64(out, off, e.sector);
            out[off + 8] = e.dev;
            out[off + 9] = e.dirty;
            out[off + 10] = e.flags;
            if let Some(c) = e.crc {
                out[off + 11] = 1;
                put_u32(out, off + 12, c);
            }
        }
        let crc_off = out.len() - 4;
        let c = crc(&out[..crc_off]);
        put_u32(out, crc_off, c);
        c
    }

    /// Decodes and validates a header against the geometry. Returns the header and its crc.
    /// Any inconsistency is an error: recovery never trusts such a header.
    pub fn decode(b: &[u8], g: &Geometry) -> std::result::Result<(Self, u32), String> {
        let len = g.header_len();
        if b.len() < len {
            return Err("header truncated".into());
        }
        let b = &b[..len];
        if b[0..8] != SEG_MAGIC {
            return Err("bad segment magic".into());
        }
        let stored = le_u32(b, len - 4);
        let c = crc(&b[..len - 4]);
        if stored != c {
            return Err("segment header checksum mismatch".into());
        }
        let n = le_u32(b, 12) as usize;
        if n > g.lines_per_segment as usize {
            return Err(format!("segment claims {n} lines"));
        }
        let gen = u16::from_le_bytes([b[28], b[29]]);
        if (gen == 0) != (g.version == 1) || b[30..32] != [0, 0] {
            return Err(format!(
                "append number {gen} invalid for format {}",
                g.version
            ));
        }
        let mut uuid = [0u8; 16];
        uuid.copy_from_slice(&b[48..64]);
        let mut entries = Vec::with_capacity(n);
        for i in 0..n {
            let off = SEG_FIXED + i * ENTRY_SIZE;
            let e = Entry {
                sector: le_u64(b, off),
                dev: b[off + 8],
                dirty: b[off + 9],
                flags: b[off + 10],
                crc: (b[off + 11] == 1).then(|| le_u32(b, off + 12)),
            };
            // Headers from before line checksums have zeros at 11..16.
            let crc_ok = b[off + 11] == 1 || (b[off + 11] == 0 && le_u32(b, off + 12) == 0);
            if !crc_ok
                || !e.sector.is_multiple_of(SECTORS_PER_LINE)
                || e.dev as usize >= MAX_BACKING
                || !matches!(e.flags, 0 | ENTRY_TOMBSTONE | ENTRY_CLEAN)
                || (e.dirty == 0) != e.is_tombstone()
                || (e.is_clean() && e.dirty != FULL_LINE)
            {
                return Err(format!("entry {i} malformed"));
            }
            entries.push(e);
        }
        let id = le_u64(b, 16);
        let back = le_u32(b, 8) as u64;
        Ok((
            SegmentHeader {
                id,
                durable: if back == 0 {
                    0
                } else {
                    id.saturating_sub(back)
                },
                lap: le_u32(b, 24) as u64,
                gen,
                nonce: le_u64(b, 32),
                prev_crc: le_u32(b, 40),
                data_crc: le_u32(b, 44),
                uuid,
                entries,
            },
            c,
        ))
    }
}

/// The header of a checkpoint area (docs/FORMAT.md, "Checkpoint").
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckpointHeader {
    /// The superblock's uuid.
    pub uuid: [u8; 16],
    /// Checkpoint number; written into area `seq % 2`.
    pub seq: u64,
    /// The writeback point (committed) when the snapshot was taken.
    pub last_writeback_id: u64,
    /// The last segment the snapshot covers.
    pub upto: u64,
    /// crc of segment `upto`'s final header.
    pub upto_crc: u32,
    /// crc32c of the entry bytes.
    pub entries_crc: u32,
    /// Entries after the header.
    pub nr_entries: u64,
    /// Every segment up to this one was durable when the checkpoint was written.
    pub durable_id: u64,
    /// The geometry's `nr_segments`.
    pub nr_segments: u64,
    /// Of the entries, loss records (the last `nr_lost`; docs/FORMAT.md, "Loss
    /// records").
    pub nr_lost: u64,
    /// A record-only checkpoint: loss records and no index (the walk starts at the
    /// writeback point; the records apply from segment `upto + 1` on).
    pub record_only: bool,
}

/// Bit 2 of a checkpoint entry's `loc`: a loss record (the line's sectors `dirty` are
/// lost) instead of a line copy.
pub const CP_LOST: u64 = 1 << 2;

/// The `loc` of a loss record of sectors `bits` in checkpoint `upto`.
pub fn lost_record(upto: u64, bits: u8) -> u64 {
    upto << 24 | (bits as u64) << 4 | CP_LOST
}

/// The lost sectors of a well-formed loss record of checkpoint `upto`, else `None`.
pub fn decode_lost_record(v: u64, upto: u64) -> Option<u8> {
    let bits = (v >> 4) as u8;
    (v == lost_record(upto, bits) && bits != 0).then_some(bits)
}

impl CheckpointHeader {
    /// Encodes the header ([`CP_HEADER`] bytes).
    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; CP_HEADER];
        b[0..8].copy_from_slice(&CP_MAGIC);
        put_u32(&mut b, 8, (self.seq % 2) as u32);
        put_u32(&mut b, 12, self.record_only as u32);
        b[16..32].copy_from_slice(&self.uuid);
        put_u64(&mut b, 32, self.seq);
        put_u64(&mut b, 40, self.last_writeback_id);
        put_u64(&mut b, 48, self.upto);
        put_u32(&mut b, 56, self.upto_crc);
        put_u32(&mut b, 60, self.entries_crc);
        put_u64(&mut b, 64, self.nr_entries);
        put_u64(&mut b, 72, self.durable_id);
        put_u64(&mut b, 80, self.nr_segments);
        put_u64(&mut b, 88, self.nr_lost);
        let c = crc(&b[..CP_HEADER - 4]);
        put_u32(&mut b, CP_HEADER - 4, c);
        b
    }

    /// Decodes the header of area `area` and checks it against the geometry and uuid.
    pub fn decode(
        b: &[u8],
        g: &Geometry,
        uuid: &[u8; 16],
        area: u64,
    ) -> std::result::Result<Self, String> {
        if b.len() < CP_HEADER {
            return Err("checkpoint header truncated".into());
        }
        if b[0..8] != CP_MAGIC {
            return Err("no checkpoint (bad magic)".into());
        }
        if le_u32(b, CP_HEADER - 4) != crc(&b[..CP_HEADER - 4]) {
            return Err("checkpoint header checksum mismatch".into());
        }
        let h = CheckpointHeader {
            uuid: b[16..32].try_into().expect("16 bytes"),
            seq: le_u64(b, 32),
            last_writeback_id: le_u64(b, 40),
            upto: le_u64(b, 48),
            upto_crc: le_u32(b, 56),
            entries_crc: le_u32(b, 60),
            nr_entries: le_u64(b, 64),
            durable_id: le_u64(b, 72),
            nr_segments: le_u64(b, 80),
            nr_lost: le_u64(b, 88),
            record_only: le_u32(b, 12) == 1,
        };
        if le_u32(b, 12) > 1 {
            return Err(format!("checkpoint {}: unknown flags", h.seq));
        }
        if &h.uuid != uuid {
            return Err("checkpoint of another cache (uuid)".into());
        }
        if le_u32(b, 8) as u64 != area || h.seq % 2 != area || h.seq == 0 {
            return Err(format!("checkpoint {} in the wrong area", h.seq));
        }
        if h.nr_segments != g.nr_segments {
            return Err("checkpoint of another geometry".into());
        }
        if h.nr_entries > g.total_lines()
            || h.nr_lost > h.nr_entries
            || (h.last_writeback_id >= h.upto && !h.record_only)
            || (h.record_only
                && (h.nr_lost != h.nr_entries || h.nr_lost == 0 || h.last_writeback_id > h.upto))
        {
            return Err("checkpoint header inconsistent".into());
        }
        Ok(h)
    }
}

/// Decodes the header copies at the start of a segment slot (`buf` holds at least
/// `g.data_start()` bytes): each copy's header and crc, or why it is not one.
pub fn decode_copies(
    buf: &[u8],
    g: &Geometry,
) -> Vec<std::result::Result<(SegmentHeader, u32), String>> {
    let hl = g.header_len();
    (0..g.header_copies())
        .map(|c| SegmentHeader::decode(&buf[c * hl..(c + 1) * hl], g))
        .collect()
}

/// The newest header of segment `id` of cache `uuid` among the copies in `buf` (the
/// start of its slot), with its crc.
pub fn newest_header(
    buf: &[u8],
    g: &Geometry,
    id: u64,
    uuid: &[u8; 16],
) -> Option<(SegmentHeader, u32)> {
    decode_copies(buf, g)
        .into_iter()
        .flatten()
        .filter(|(h, _)| h.id == id && &h.uuid == uuid && h.lap == g.lap(id))
        .max_by_key(|(h, _)| h.gen)
}

/// Segment `id`'s header among the copies in `buf`: append `gen` when given (the one
/// recovery took, its newest having failed its checks), else the newest.
pub fn segment_header(
    buf: &[u8],
    g: &Geometry,
    id: u64,
    uuid: &[u8; 16],
    gen: Option<u16>,
) -> Option<SegmentHeader> {
    match gen {
        Some(gen) => decode_copies(buf, g)
            .into_iter()
            .flatten()
            .find(|(h, _)| h.id == id && &h.uuid == uuid && h.gen == gen),
        None => newest_header(buf, g, id, uuid),
    }
    .map(|(h, _)| h)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The segment count left after the checkpoint areas is the largest that fits, as
    /// a walk down from the ring's slot count finds it.
    #[test]
    fn the_segment_count_is_the_largest_that_fits_beside_the_checkpoint_areas() {
        for device in [3 << 20, 5 << 20, 64 << 20, (1 << 30) + 12345, 1 << 40] {
            for segment in [64 << 10, 1 << 20, 4 << 20] {
                let Ok(g) = Geometry::new(4096, segment, device) else {
                    continue;
                };
                let mut walk = Geometry {
                    nr_segments: device / segment as u64 - 1,
                    ..g
                };
                while walk.device_bytes() > device && walk.nr_segments > 2 {
                    walk.nr_segments -= 1;
                }
                assert_eq!(g.nr_segments, walk.nr_segments, "{device} {segment}");
            }
        }
    }

    /// Found by the `superblock` fuzz target: the size of such a geometry overflowed.
    #[test]
    fn a_superblock_whose_geometry_overflows_a_u64_is_refused_not_a_panic() {
        let g = Geometry::new(512, 1 << 20, 64 << 20).unwrap();
        for (nr_segments, lines_per_segment) in [
            (u64::MAX / 2, g.lines_per_segment),
            (u64::MAX, 1),
            (1 << 40, u32::MAX),
        ] {
            let sb = Superblock {
                geometry: Geometry {
                    nr_segments,
                    lines_per_segment,
                    ..g
                },
                uuid: [1; 16],
                seq: 1,
                last_writeback_id: 0,
                durable_id: 0,
                last_writeback_crc: None,
                backing: vec![None; MAX_BACKING],
            };
            assert!(matches!(
                Superblock::decode(&sb.encode(), "t"),
                Err(Error::BadFormat { .. })
            ));
        }
    }

    #[test]
    fn geometry_matches_format_doc() {
        // docs/FORMAT.md: format 2, 1 MiB segments: two 2-block header copies, 252 lines.
        let g = Geometry::new(512, 1 << 20, 64 << 20).unwrap();
        assert_eq!(
            (
                g.version,
                g.header_blocks,
                g.lines_per_segment,
                g.nr_segments
            ),
            (2, 2, 252, 62)
        );
        // Two checkpoint areas of 4096 + 16 * 62 * 252 bytes, rounded up to 4 KiB.
        assert_eq!(g.checkpoint_area_bytes(), 258048);
        assert_eq!(g.checkpoint_offset(0), 63 << 20);
        assert!(g.device_bytes() <= 64 << 20);
        assert_eq!(
            Geometry::new(512, 1 << 20, g.device_bytes()).unwrap(),
            g,
            "the geometry recomputed from the bytes it uses"
        );
        assert_eq!(g.data_start(), 4 * 4096);
        assert_eq!(g.line_offset(1, 0), (1 << 20) + 4 * 4096);
        let g = Geometry::new(4096, 64 << 10, 1 << 20).unwrap();
        assert_eq!((g.header_blocks, g.lines_per_segment), (1, 14));
        let g = Geometry::new(512, 4 << 20, 64 << 20).unwrap();
        assert_eq!((g.header_blocks, g.lines_per_segment), (4, 1016));
        // Format 1: one header copy.
        let g = Geometry::with_version(1, 512, 1 << 20, 64 << 20).unwrap();
        assert_eq!((g.header_blocks, g.lines_per_segment), (2, 254));
        assert_eq!(g.line_offset(1, 0), (1 << 20) + 2 * 4096);
        let g = Geometry::with_version(1, 512, 4 << 20, 64 << 20).unwrap();
        assert_eq!((g.header_blocks, g.lines_per_segment), (5, 1019));
        assert_eq!(g.segment_offset(1), 4 << 20);
        assert_eq!(g.segment_offset(1 + g.nr_segments), 4 << 20);
        assert_eq!(g.lap(g.nr_segments + 1), 2);
        assert!(Geometry::new(1024, 1 << 20, 64 << 20).is_err());
        assert!(Geometry::new(512, 3 << 20, 64 << 20).is_err());
        assert!(Geometry::new(512, 32 << 10, 64 << 20).is_err());
        assert!(Geometry::new(512, 1 << 20, 2 << 20).is_err());
        assert!(Geometry::with_version(3, 512, 1 << 20, 64 << 20).is_err());
        // Format 1 has no checkpoint areas: its ring is as before.
        let g = Geometry::with_version(1, 512, 1 << 20, 64 << 20).unwrap();
        assert_eq!((g.nr_segments, g.checkpoint_area_bytes()), (63, 0));
        assert_eq!(g.device_bytes(), 64 << 20);
    }

    #[test]
    fn checkpoint_header_round_trip_and_corruption() {
        let g = Geometry::new(512, 64 << 10, 4 << 20).unwrap();
        let h = CheckpointHeader {
            uuid: [3; 16],
            seq: 5,
            last_writeback_id: 7,
            upto: 20,
            upto_crc: 0xdead,
            entries_crc: 0xbeef,
            nr_entries: 30,
            durable_id: 21,
            nr_segments: g.nr_segments,
            nr_lost: 2,
            record_only: false,
        };
        let b = h.encode();
        assert_eq!(b.len(), CP_HEADER);
        assert_eq!(&b[0..8], b"lcCKPT\0\0");
        // Loss records: flags at 12 (0 here), nr_lost at 88.
        assert_eq!(&b[12..16], &[0; 4]);
        assert_eq!(&b[88..96], &2u64.to_le_bytes());
        assert_eq!((le_u32(&b, 8), le_u64(&b, 48)), (1, 20));
        assert_eq!(CheckpointHeader::decode(&b, &g, &[3; 16], 1).unwrap(), h);
        assert!(CheckpointHeader::decode(&b, &g, &[3; 16], 0).is_err());
        assert!(CheckpointHeader::decode(&b, &g, &[4; 16], 1).is_err());
        for i in 0..CP_HEADER {
            let mut x = b.clone();
            x[i] ^= 0x10;
            assert!(
                CheckpointHeader::decode(&x, &g, &[3; 16], 1).is_err(),
                "flip at {i} accepted"
            );
        }
        // A record alone: every entry a loss record, at least one; unknown flags refused.
        let alone = |nr_entries, nr_lost, flags: u32| {
            let mut b = CheckpointHeader {
                nr_entries,
                nr_lost,
                record_only: true,
                ..h.clone()
            }
            .encode();
            put_u32(&mut b, 12, flags);
            let c = crc(&b[..CP_HEADER - 4]);
            put_u32(&mut b, CP_HEADER - 4, c);
            CheckpointHeader::decode(&b, &g, &[3; 16], 1)
        };
        assert!(alone(3, 3, 1).is_ok_and(|h| h.record_only));
        assert!(alone(3, 2, 1).is_err());
        assert!(alone(0, 0, 1).is_err());
        assert!(alone(3, 3, 2).is_err());
    }

    #[test]
    fn format_doc_tables_match_the_code() {
        let doc = include_str!("../../docs/FORMAT.md");
        let mut rows = 0;
        for line in doc.lines() {
            let cells: Vec<&str> = line.split('|').map(str::trim).collect();
            // Segment geometry table:
            // | S | header_blocks | lines_per_segment | header_blocks v1 | lines v1 |
            if cells.len() == 7 && cells[1].ends_with("iB") && cells[2].parse::<u32>().is_ok() {
                let (num, unit) = cells[1].split_once(' ').expect("size with unit");
                let s: u32 = num.parse::<u32>().expect("size")
                    * if unit == "MiB" { 1 << 20 } else { 1 << 10 };
                for (v, col) in [(2, 2), (1, 4)] {
                    let g = Geometry::with_version(v, 512, s, s as u64 * 4).expect("geometry");
                    assert_eq!(
                        cells[col].parse::<u32>().unwrap(),
                        g.header_blocks,
                        "{line}"
                    );
                    assert_eq!(
                        cells[col + 1].parse::<u32>().unwrap(),
                        g.lines_per_segment,
                        "{line}"
                    );
                }
                rows += 1;
            }
        }
        assert_eq!(
            rows, 3,
            "segment geometry table not found in docs/FORMAT.md"
        );
        assert!(doc.contains(&format!("| {SB_CRC_OFF} | u32 | crc |")));
        assert!(doc.contains(&format!(
            "| {SB_TABLE_OFF} | 255 × {SB_ENTRY_SIZE} B | backing table |"
        )));
        assert!(doc.contains(&format!("| {SEG_FIXED} | {ENTRY_SIZE} B × n | entries |")));
        assert!(doc.contains(&format!(
            "`+10 u8 flags` (bit 0 = discard record, value {ENTRY_TOMBSTONE}; bit 1 = clean copy, value {ENTRY_CLEAN})"
        )));
        assert!(doc.contains("dirty << 4 | clean << 1 | discard"));
        assert!(doc.contains(&format!("superblock copy A ({SB_COPY_SIZE} bytes)")));
        assert!(doc.contains(&format!("| {} | u32 | crc |", CP_HEADER - 4)));
        assert!(doc.contains(&format!("the header ({CP_HEADER} bytes)")));
    }

    #[test]
    fn superblock_round_trip_and_layout() {
        let g = Geometry::new(512, 1 << 20, 64 << 20).unwrap();
        let mut backing = vec![None; MAX_BACKING];
        backing[3] = Some(BackingRecord {
            size: 12345,
            label: "disk0".into(),
            since: MAX_SINCE - 7,
        });
        let sb = Superblock {
            geometry: g,
            uuid: [7; 16],
            seq: 9,
            last_writeback_id: 42,
            durable_id: 45,
            last_writeback_crc: Some(0xfeed_f00d),
            backing,
        };
        let b = sb.encode();
        assert_eq!(b.len(), SB_COPY_SIZE);
        assert_eq!(&b[0..8], b"lcCACHE\0");
        assert_eq!(le_u64(&b, 64), 42);
        assert_eq!((le_u32(&b, 80), b[84]), (0xfeed_f00d, 1));
        assert_eq!(b[SB_TABLE_OFF + 3 * SB_ENTRY_SIZE], 3);
        // `since`, 48 bits at +2 of the entry.
        let e = SB_TABLE_OFF + 3 * SB_ENTRY_SIZE;
        assert_eq!(b[e + 2..e + 8], (MAX_SINCE - 7).to_le_bytes()[..6]);
        assert_eq!(Superblock::decode(&b, "t").unwrap(), sb);
        let mut bad = b.clone();
        bad[100] ^= 1;
        assert!(Superblock::decode(&bad, "t").is_err());
        let mut v3 = b.clone();
        put_u32(&mut v3, 8, 3);
        let c = crc(&v3[..SB_CRC_OFF]);
        put_u32(&mut v3, SB_CRC_OFF, c);
        let e = Superblock::decode(&v3, "t").unwrap_err().to_string();
        assert!(e.contains("version 3"), "{e}");
        // A format-1 superblock still decodes, with its one-copy geometry.
        let v1 = Superblock {
            geometry: Geometry::with_version(1, 512, 1 << 20, 64 << 20).unwrap(),
            ..sb.clone()
        };
        let d = Superblock::decode(&v1.encode(), "t").unwrap();
        assert_eq!((d.geometry.version, d.geometry.lines_per_segment), (1, 254));
        // Version 1 with version 2's geometry is inconsistent.
        let mut mixed = b.clone();
        put_u32(&mut mixed, 8, 1);
        let c = crc(&mixed[..SB_CRC_OFF]);
        put_u32(&mut mixed, SB_CRC_OFF, c);
        assert!(Superblock::decode(&mixed, "t").is_err());
    }

    #[test]
    fn segment_header_round_trip_and_corruption() {
        let g = Geometry::new(512, 64 << 10, 1 << 20).unwrap();
        let h = SegmentHeader {
            id: 5,
            lap: 1,
            gen: 3,
            nonce: 99,
            prev_crc: 1234,
            durable: 3,
            data_crc: 5678,
            uuid: [1; 16],
            entries: vec![
                Entry {
                    sector: 8,
                    dev: 1,
                    dirty: 0xff,
                    flags: 0,
                    crc: Some(0xdead_beef),
                },
                Entry {
                    sector: 80,
                    dev: 2,
                    dirty: 0,
                    flags: ENTRY_TOMBSTONE,
                    crc: None,
                },
                Entry {
                    sector: 160,
                    dev: 2,
                    dirty: FULL_LINE,
                    flags: ENTRY_CLEAN,
                    crc: Some(0),
                },
            ],
        };
        let mut buf = vec![0u8; g.header_len()];
        let c = h.encode_into(&mut buf);
        assert_eq!(&buf[0..8], b"lcSEGHD\0");
        assert_eq!(le_u64(&buf, SEG_FIXED), 8);
        assert_eq!(le_u32(&buf, 8), 2, "durable_back = id - durable");
        assert_eq!((le_u32(&buf, 24), buf[28], buf[29]), (1, 3, 0), "lap, gen");
        let (d, c2) = SegmentHeader::decode(&buf, &g).unwrap();
        assert_eq!((d, c2), (h.clone(), c));
        // Not recorded (format v1 logs before the field): 0 on disk, 0 decoded.
        let old = SegmentHeader {
            durable: 0,
            ..h.clone()
        };
        old.encode_into(&mut buf);
        assert_eq!(le_u32(&buf, 8), 0);
        assert_eq!(SegmentHeader::decode(&buf, &g).unwrap().0.durable, 0);
        h.encode_into(&mut buf);
        for i in 0..buf.len() {
            let mut b = buf.clone();
            b[i] ^= 0x40;
            assert!(
                SegmentHeader::decode(&b, &g).is_err(),
                "flip at {i} accepted"
            );
        }
        // Generation 0 is format 1's, and only format 1's.
        let v1 = Geometry::with_version(1, 512, 64 << 10, 1 << 20).unwrap();
        assert!(SegmentHeader::decode(&buf, &v1).is_err());
        let h1 = SegmentHeader {
            gen: 0,
            ..h.clone()
        };
        let mut b1 = vec![0u8; v1.header_len()];
        h1.encode_into(&mut b1);
        assert_eq!(SegmentHeader::decode(&b1, &v1).unwrap().0, h1);
        assert!(SegmentHeader::decode(&b1, &g).is_err());
    }

    #[test]
    fn line_checksums_sit_in_the_entries_reserved_bytes() {
        let g = Geometry::new(512, 64 << 10, 1 << 20).unwrap();
        let mut h = small_header(
            (0..3)
                .map(|i| Entry {
                    sector: 8 * i,
                    dev: 0,
                    dirty: FULL_LINE,
                    flags: 0,
                    crc: None,
                })
                .collect(),
        );
        h.entries[1].crc = Some(0x0102_0304);
        h.entries[2].crc = Some(0);
        let mut buf = vec![0u8; g.header_len()];
        h.encode_into(&mut buf);
        let e = |i: usize| SEG_FIXED + i * ENTRY_SIZE;
        assert_eq!(
            &buf[e(0) + 11..e(0) + 16],
            &[0; 5],
            "no crc: zeros, as before"
        );
        assert_eq!(&buf[e(1) + 11..e(1) + 16], &[1, 4, 3, 2, 1]);
        assert_eq!(
            &buf[e(2) + 11..e(2) + 16],
            &[1, 0, 0, 0, 0],
            "a crc of 0 is recorded"
        );
        assert_eq!(SegmentHeader::decode(&buf, &g).unwrap().0, h);
        // Anything else in those bytes is malformed, even under a valid header crc.
        for (at, v) in [(e(0) + 11, 2u8), (e(0) + 12, 1), (e(1) + 11, 3)] {
            let mut b = buf.clone();
            b[at] = v;
            let n = b.len() - 4;
            let c = crc(&b[..n]);
            put_u32(&mut b, n, c);
            assert!(
                SegmentHeader::decode(&b, &g).is_err(),
                "byte {at} = {v} accepted"
            );
        }
    }

    #[test]
    fn a_data_crc_extends_line_by_line() {
        let mut lines = vec![0u8; 5 * LINE as usize];
        for (i, b) in lines.iter_mut().enumerate() {
            *b = (i * 7 + i / 4096) as u8;
        }
        let mut entries = [Entry {
            sector: 0,
            dev: 0,
            dirty: FULL_LINE,
            flags: 0,
            crc: None,
        }; 5];
        let first = crc(&lines[..2 * LINE as usize]);
        let all = seal_lines(first, &mut entries[2..], &lines[2 * LINE as usize..]);
        assert_eq!(all, crc(&lines));
        for (i, e) in entries.iter().enumerate().skip(2) {
            let l = &lines[i * LINE as usize..(i + 1) * LINE as usize];
            assert_eq!(e.crc, Some(crc(l)));
        }
        assert_eq!(entries[0].crc, None);
        assert_eq!(
            crc_extend_line(crc(b""), crc(&lines[..4096])),
            crc(&lines[..4096])
        );
    }

    /// Segment 5's first append, holding `entries`.
    fn small_header(entries: Vec<Entry>) -> SegmentHeader {
        SegmentHeader {
            id: 5,
            lap: 1,
            gen: 1,
            nonce: 1,
            prev_crc: 0,
            durable: 4,
            data_crc: 0,
            uuid: [1; 16],
            entries,
        }
    }

    #[test]
    fn a_clean_entry_is_a_full_line_and_nothing_else() {
        let g = Geometry::new(512, 64 << 10, 1 << 20).unwrap();
        let header = |dirty: u8, flags: u8| {
            small_header(vec![Entry {
                sector: 8,
                dev: 0,
                dirty,
                flags,
                crc: None,
            }])
        };
        let mut buf = vec![0u8; g.header_len()];
        header(FULL_LINE, ENTRY_CLEAN).encode_into(&mut buf);
        let (h, _) = SegmentHeader::decode(&buf, &g).unwrap();
        assert!(h.entries[0].is_clean() && !h.entries[0].is_tombstone());
        for (dirty, flags) in [
            (0x0f, ENTRY_CLEAN),
            (0, ENTRY_CLEAN),
            (0, ENTRY_CLEAN | ENTRY_TOMBSTONE),
            (FULL_LINE, ENTRY_CLEAN | ENTRY_TOMBSTONE),
            (FULL_LINE, 4),
        ] {
            header(dirty, flags).encode_into(&mut buf);
            assert!(
                SegmentHeader::decode(&buf, &g).is_err(),
                "dirty {dirty:#x} flags {flags} accepted"
            );
        }
    }
}
