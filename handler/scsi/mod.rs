//! SCSI disk emulation (SPC-4 / SBC-3 subset) over a [`BlockBackend`]: no TCMU and no
//! cache-engine knowledge. The transport parses a CDB once ([`Command::parse`]; the
//! command tells it which way its data moves), then [`execute_data`] runs the
//! [`Command`] on its data as the transport holds it ([`Data`]: scattered pieces, used
//! in place: a WRITE's Data-Out goes to the backend as it is, a READ fills its Data-In
//! buffer directly), and returns status, sense and any small Data-In; [`execute`] takes
//! CDB bytes and one contiguous buffer (tests, fuzzing). Bad input gets CHECK
//! CONDITION with the matching sense; nothing here panics on any input.

pub mod cdb;
pub mod sense;
pub mod xcopy;

use std::borrow::Cow;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard, TryLockError};

pub use cdb::{Blocks, Command, Direction, Lba};
use cdb::{PageControl, ReportType, ReportingOptions, VerifyCheck, WriteVerifyCheck, SUPPORTED};
use sense::{Sense, CHECK_CONDITION, GOOD};

/// An I/O error of the backend, with the failing byte offset if known.
#[derive(Debug, Clone)]
pub struct IoError {
    /// Failing byte offset (for the INFORMATION field of MEDIUM ERROR sense).
    pub offset: Option<u64>,
    /// What happened (logged by the caller).
    pub message: String,
    /// Whose failure it is: the medium at that offset, or the target itself.
    pub kind: IoErrorKind,
}

/// Whose failure an [`IoError`] is, which decides the sense key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum IoErrorKind {
    /// The data at the offset cannot be read or written (a failing or dead disk, data
    /// lost to damage): MEDIUM ERROR with the LBA.
    #[default]
    Medium,
    /// The target cannot serve the command at all (its cache failed, or an internal
    /// inconsistency): HARDWARE ERROR / INTERNAL TARGET FAILURE.
    Target,
}

/// Which way a failed transfer went, for the additional sense code.
#[derive(Debug, Clone, Copy)]
enum Dir {
    Read,
    Write,
}

impl IoError {
    /// The one mapping of backend errors to sense data: the medium's failures are
    /// MEDIUM ERROR / UNRECOVERED READ ERROR or WRITE ERROR with the failing block in
    /// INFORMATION (the backend's offset, else `at`, the block the failed call began
    /// at, if any); the target's are HARDWARE ERROR / INTERNAL TARGET FAILURE.
    fn response(&self, dir: Dir, at: Option<Lba>, block_size: u64) -> ScsiResponse {
        match (self.kind, dir) {
            (IoErrorKind::Medium, dir) => ScsiResponse::check(
                match dir {
                    Dir::Read => sense::UNRECOVERED_READ_ERROR,
                    Dir::Write => sense::WRITE_ERROR,
                },
                self.offset.map(|o| o / block_size).or(at.map(|l| l.0)),
            ),
            (IoErrorKind::Target, _) => ScsiResponse::internal_failure(),
        }
    }
}

/// What a LUN stores blocks in. Data moves in scattered form: `bufs` / `data` are the
/// pieces of one transfer in order (a TCMU command's iovecs), whose total length is a
/// multiple of the block size (the pieces need not be).
pub trait BlockBackend: Send + Sync {
    /// Reads the total length of `bufs` at byte `offset` into them.
    fn read(&self, offset: u64, bufs: &mut [&mut [u8]]) -> Result<(), IoError>;
    /// Writes the concatenation of `data` at byte `offset`; durable before returning
    /// when `fua`.
    fn write(&self, offset: u64, data: &[&[u8]], fua: bool) -> Result<(), IoError>;
    /// Makes all completed writes durable.
    fn flush(&self) -> Result<(), IoError>;
    /// Discards a byte range (reads as zeros afterwards).
    fn discard(&self, offset: u64, len: u64) -> Result<(), IoError>;
    /// [`BlockBackend::read`] that never blocks: `None` when it would have to wait
    /// for a device. The default never serves.
    fn try_read(&self, _offset: u64, _bufs: &mut [&mut [u8]]) -> Option<Result<(), IoError>> {
        None
    }
    /// Begins a read whose device reads the caller performs itself ([`StartedRead`]);
    /// `None` when the backend cannot (then [`BlockBackend::read`] serves it). Never
    /// blocks. The default never begins one.
    fn start_read(&self, _offset: u64, _bufs: &mut [&mut [u8]]) -> Option<StartedRead> {
        None
    }
    /// [`BlockBackend::write`] without FUA that never blocks: `None` when it would
    /// have to wait; the write is then repeated with [`BlockBackend::write`].
    fn try_write(&self, _offset: u64, _data: &[&[u8]]) -> Option<Result<(), IoError>> {
        None
    }
}

/// [`StartedRead::finish`]: given the filled buffer, whether its bytes are the answer.
pub type FinishRead = Box<dyn FnOnce(&[&[u8]]) -> bool + Send>;

/// A READ begun with [`BlockBackend::start_read`], whose device reads the caller
/// performs itself (the event loop's io_uring): `reads` from `fd` into the command's
/// buffer, then `finish`.
pub struct StartedRead {
    /// The file to read.
    pub fd: std::os::fd::RawFd,
    /// The alignment each read's buffer and length need (`O_DIRECT`), or 1.
    pub align: usize,
    /// (byte offset in `fd`, position in the buffer, length).
    pub reads: Vec<(u64, usize, usize)>,
    /// Called once every read filled its bytes, with the buffer they filled: `true`
    /// when they are the answer, `false` when the read must be done again with
    /// [`BlockBackend::read`].
    pub finish: FinishRead,
}

/// A command's data as the transport holds it: the pieces of its buffer in order (a
/// TCMU command's iovecs over the ring's data area), used in place.
pub enum Data<'a, 'b> {
    /// Data-Out pieces (a write's data, a parameter list), and the room for Data-In,
    /// which the small responses of non-READ commands return in
    /// [`ScsiResponse::data_in`].
    Out(&'a [&'b [u8]], usize),
    /// A READ's Data-In buffer, filled in place (see [`ScsiResponse::placed`]).
    In(&'a mut [&'b mut [u8]]),
}

impl Data<'_, '_> {
    fn out_len(&self) -> u64 {
        match self {
            Data::Out(p, _) => p.iter().map(|x| x.len() as u64).sum(),
            Data::In(_) => 0,
        }
    }

    fn data_in_len(&self) -> usize {
        match self {
            Data::Out(_, n) => *n,
            Data::In(b) => b.iter().map(|x| x.len()).sum(),
        }
    }

    /// The Data-Out as one buffer: borrowed when it is one piece, else copied. Only
    /// for what is parsed or compared as a whole and is small or rare (parameter lists
    /// of MODE SELECT, UNMAP and EXTENDED COPY, the one block of WRITE SAME, the data
    /// of COMPARE AND WRITE, VERIFY and WRITE AND VERIFY); a WRITE's data goes to the
    /// backend in pieces.
    fn contiguous(&self) -> Cow<'_, [u8]> {
        match self {
            Data::Out([one], _) => Cow::Borrowed(one),
            Data::Out(p, _) => Cow::Owned(p.concat()),
            Data::In(_) => Cow::Borrowed(&[]),
        }
    }
}

/// A backend view that only takes the non-blocking calls and records whether one
/// of them would have blocked.
struct NonBlocking<'a> {
    be: &'a dyn BlockBackend,
    blocked: AtomicBool,
}

impl NonBlocking<'_> {
    fn would_block(&self) -> IoError {
        self.blocked.store(true, Ordering::Relaxed);
        IoError {
            offset: None,
            message: "would block".into(),
            kind: IoErrorKind::Target,
        }
    }
}

impl BlockBackend for NonBlocking<'_> {
    fn read(&self, offset: u64, bufs: &mut [&mut [u8]]) -> Result<(), IoError> {
        if self.blocked.load(Ordering::Relaxed) {
            return Err(self.would_block());
        }
        self.be
            .try_read(offset, bufs)
            .unwrap_or_else(|| Err(self.would_block()))
    }
    fn write(&self, offset: u64, data: &[&[u8]], fua: bool) -> Result<(), IoError> {
        if fua || self.blocked.load(Ordering::Relaxed) {
            return Err(self.would_block());
        }
        self.be
            .try_write(offset, data)
            .unwrap_or_else(|| Err(self.would_block()))
    }
    fn flush(&self) -> Result<(), IoError> {
        Err(self.would_block())
    }
    fn discard(&self, _offset: u64, _len: u64) -> Result<(), IoError> {
        Err(self.would_block())
    }
}

/// The TCMU data area of a device created with default attributes (`max_data_area_mb`
/// 1024).
pub const DEFAULT_DATA_AREA: u64 = 1 << 30;

/// The TCMU command ring's largest size (`cmd_ring_size_mb` is capped at 8 MiB): the
/// data area of a map is at least its size minus this.
pub const MAX_RING_AREA: u64 = 8 << 20;

/// The largest transfer, in blocks, of a device whose TCMU data area is `data_area`
/// bytes: `queue_cmd_ring` refuses (INVALID FIELD IN CDB) any command whose data does
/// not fit the data area, and hands over every other one, whatever `hw_max_sectors`
/// says (user backstores parse CDBs with `passthrough_parse_cdb`, which checks no
/// transfer length).
pub fn max_transfer_for_data_area(data_area: u64, block_size: u32) -> u32 {
    (data_area / block_size.max(1) as u64).min(u32::MAX as u64) as u32
}

/// Static description of a LUN.
#[derive(Clone, Debug)]
pub struct LunConfig {
    /// T10 vendor id (8 bytes, space padded).
    pub vendor: String,
    /// Product id (16 bytes).
    pub product: String,
    /// Product revision (4 bytes).
    pub revision: String,
    /// Unit serial number (VPD 0x80).
    pub serial: String,
    /// Logical block size, 512 or 4096.
    pub block_size: u32,
    /// Capacity in blocks.
    pub num_blocks: u64,
    /// MAXIMUM TRANSFER LENGTH reported in the Block Limits page, in blocks: what the
    /// kernel can hand over in one command (the TCMU data area; see
    /// [`max_transfer_for_data_area`]). Larger transfers are not refused here either:
    /// the kernel already refuses commands that do not fit its data area.
    pub max_transfer_blocks: u32,
    /// OPTIMAL TRANSFER LENGTH in blocks (the backstore's `hw_max_sectors`, which LIO
    /// itself also reports as optimal); at most `max_transfer_blocks`.
    pub opt_transfer_blocks: u32,
    /// MAXIMUM COMPARE AND WRITE LENGTH in blocks (1..=255).
    pub max_compare_write_blocks: u8,
    /// Largest UNMAP / WRITE SAME range in blocks.
    pub max_unmap_blocks: u32,
    /// Largest number of UNMAP block descriptors.
    pub max_unmap_descriptors: u32,
    /// Medium rotation rate for VPD 0xB1 (1 = non-rotating).
    pub rotation_rate: u16,
}

impl LunConfig {
    /// Defaults for an lc LUN of `num_blocks` blocks.
    pub fn new(serial: &str, block_size: u32, num_blocks: u64) -> Self {
        LunConfig {
            vendor: "LIO-ORG".into(),
            product: "lc".into(),
            revision: "0001".into(),
            serial: serial.into(),
            block_size,
            num_blocks,
            max_transfer_blocks: max_transfer_for_data_area(DEFAULT_DATA_AREA, block_size),
            opt_transfer_blocks: 128,
            max_compare_write_blocks: 255,
            max_unmap_blocks: (1 << 30) / block_size,
            max_unmap_descriptors: 256,
            rotation_rate: 1,
        }
    }
}

/// A LUN: its configuration and mutable mode state.
#[derive(Debug)]
pub struct LunState {
    /// Configuration (`num_blocks` is the capacity at creation; see
    /// [`LunState::num_blocks`]).
    pub cfg: LunConfig,
    wce: AtomicBool,
    blocks: AtomicU64,
    capacity_changed: AtomicBool,
    /// Commands that touch the medium hold it shared; COMPARE AND WRITE holds it
    /// exclusive, so no other command's data moves between its compare and its write.
    /// The event loop only ever tries it ([`try_execute`]); workers wait for it.
    io: RwLock<()>,
}

impl LunState {
    /// A LUN with the write cache enabled.
    pub fn new(cfg: LunConfig) -> Self {
        LunState {
            blocks: AtomicU64::new(cfg.num_blocks),
            cfg,
            wce: AtomicBool::new(true),
            capacity_changed: AtomicBool::new(false),
            io: RwLock::new(()),
        }
    }

    /// Write cache enabled (WCE in the caching mode page).
    pub fn write_cache(&self) -> bool {
        self.wce.load(Ordering::Relaxed)
    }

    /// Enables or disables the write cache (`attrib/emulate_write_cache` written on a
    /// live device). Disabled, every write is forced to the cache device (as FUA).
    pub fn set_write_cache(&self, on: bool) {
        self.wce.store(on, Ordering::Relaxed);
    }

    /// Current capacity in blocks.
    pub fn num_blocks(&self) -> u64 {
        self.blocks.load(Ordering::Relaxed)
    }

    /// LBA OUT OF RANGE unless blocks `lba .. lba + blocks` lie within the capacity.
    fn check_range(&self, lba: Lba, blocks: Blocks) -> Result<(), ScsiResponse> {
        match lba.checked_end(blocks) {
            Some(end) if end.0 <= self.num_blocks() => Ok(()),
            _ => Err(ScsiResponse::error(sense::LBA_OUT_OF_RANGE)),
        }
    }

    /// Changes the capacity (`attrib/dev_size` written on a live device); the next
    /// command other than INQUIRY and REQUEST SENSE gets UNIT ATTENTION / CAPACITY
    /// DATA HAS CHANGED, once, so the initiator rereads the capacity.
    pub fn resize(&self, blocks: u64) {
        if self.blocks.swap(blocks, Ordering::Relaxed) != blocks {
            self.capacity_changed.store(true, Ordering::Release);
        }
    }
}

/// A command's outcome.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScsiResponse {
    /// SAM status.
    pub status: u8,
    /// Sense data (empty unless CHECK CONDITION).
    pub sense: Vec<u8>,
    /// Data-In bytes to copy into the command's buffer.
    pub data_in: Vec<u8>,
    /// Data-In bytes already in the command's buffer: what a READ run with
    /// [`Data::In`] filled (from its start; `data_in` is empty then).
    pub placed: usize,
}

impl ScsiResponse {
    fn good(data_in: Vec<u8>) -> Self {
        ScsiResponse {
            status: GOOD,
            sense: Vec::new(),
            data_in,
            placed: 0,
        }
    }

    /// GOOD for a READ that filled the first `placed` bytes of its Data-In in place.
    pub fn placed(placed: usize) -> Self {
        ScsiResponse {
            placed,
            ..ScsiResponse::good(Vec::new())
        }
    }

    fn check(s: Sense, info: Option<u64>) -> Self {
        ScsiResponse {
            status: CHECK_CONDITION,
            sense: s.fixed(info),
            data_in: Vec::new(),
            placed: 0,
        }
    }

    /// Data-In bytes the command produced, in `data_in` or in place.
    pub fn data_in_len(&self) -> usize {
        self.data_in.len().max(self.placed)
    }

    /// CHECK CONDITION, HARDWARE ERROR / INTERNAL TARGET FAILURE: what a command
    /// whose ring entry was malformed gets.
    pub fn internal_failure() -> Self {
        Self::error(sense::INTERNAL_TARGET_FAILURE)
    }

    /// CHECK CONDITION, ABORTED COMMAND / COMMAND TIMEOUT BEFORE PROCESSING: a command
    /// that waited too long for a worker (its device's backend is slow or hung).
    pub fn timed_out() -> Self {
        Self::error(sense::COMMAND_TIMEOUT_BEFORE_PROCESSING)
    }

    /// CHECK CONDITION with `sense` and no INFORMATION: what a CDB that does not parse
    /// gets ([`Command::parse`]'s error).
    pub fn error(sense: Sense) -> Self {
        Self::check(sense, None)
    }
}

/// How a command holds the LUN's I/O lock.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Access {
    /// No medium access.
    None,
    /// Reads or writes the medium: any number at once.
    Shared,
    /// Compare-then-write: alone.
    Exclusive,
}

fn access(cmd: &Command) -> Access {
    match cmd {
        Command::Read { .. }
        | Command::Write { .. }
        | Command::SyncCache { .. }
        | Command::WriteSame { .. }
        | Command::Unmap { .. }
        | Command::Verify { .. }
        | Command::WriteVerify { .. } => Access::Shared,
        Command::CompareAndWrite { .. } => Access::Exclusive,
        _ => Access::None,
    }
}

/// A held I/O lock (dropped at the end of the command).
#[allow(dead_code)] // held for its Drop
enum Held<'a> {
    None,
    Shared(RwLockReadGuard<'a, ()>),
    Exclusive(RwLockWriteGuard<'a, ()>),
}

/// Takes the lock `a` needs: waiting for it when `wait`, else `None` if it is taken.
fn lock(io: &RwLock<()>, a: Access, wait: bool) -> Option<Held<'_>> {
    fn tried<G>(r: Result<G, TryLockError<G>>) -> Option<G> {
        match r {
            Ok(g) => Some(g),
            Err(TryLockError::Poisoned(p)) => Some(p.into_inner()),
            Err(TryLockError::WouldBlock) => None,
        }
    }
    Some(match (a, wait) {
        (Access::None, _) => Held::None,
        (Access::Shared, true) => Held::Shared(io.read().unwrap_or_else(PoisonError::into_inner)),
        (Access::Shared, false) => Held::Shared(tried(io.try_read())?),
        (Access::Exclusive, true) => {
            Held::Exclusive(io.write().unwrap_or_else(PoisonError::into_inner))
        }
        (Access::Exclusive, false) => Held::Exclusive(tried(io.try_write())?),
    })
}

fn pad(s: &str, n: usize) -> Vec<u8> {
    let mut v: Vec<u8> = s
        .bytes()
        .filter(|b| (0x20..0x7f).contains(b))
        .take(n)
        .collect();
    v.resize(n, b' ');
    v
}

fn truncate(mut v: Vec<u8>, alloc: usize) -> Vec<u8> {
    v.truncate(alloc);
    v
}

/// Executes one command if that needs no blocking backend call (a read served from
/// RAM, a plain write with a free RAM buffer, or no I/O at all) and the LUN's I/O lock
/// is free; `None` otherwise, and the command is then run with [`execute`] where
/// blocking is allowed. A command cut short here may have written part of its data;
/// `execute` writes it all again. COMPARE AND WRITE never runs here: cut short after
/// its write had begun, it would compare against its own data when run again.
pub fn try_execute(
    lun: &LunState,
    cdb_bytes: &[u8],
    data_out: &[u8],
    data_in_len: usize,
    be: &dyn BlockBackend,
) -> Option<ScsiResponse> {
    match Command::parse(cdb_bytes) {
        Ok(cmd) => try_execute_data(lun, &cmd, Data::Out(&[data_out], data_in_len), be),
        Err(s) => Some(ScsiResponse::error(s)),
    }
}

/// [`try_execute`] of a parsed command with its data in place ([`Data`]).
pub fn try_execute_data(
    lun: &LunState,
    cmd: &Command,
    data: Data<'_, '_>,
    be: &dyn BlockBackend,
) -> Option<ScsiResponse> {
    // EXTENDED COPY waits for other LUNs' I/O locks: never on the loop thread.
    if matches!(
        cmd,
        Command::CompareAndWrite { .. } | Command::ExtendedCopy { .. }
    ) {
        return None;
    }
    let nb = NonBlocking {
        be,
        blocked: Default::default(),
    };
    let r = run(lun, cmd, data, &nb, false)?;
    (!nb.blocked.into_inner()).then_some(r)
}

/// Begins a READ on the loop thread whose device reads the caller performs itself
/// ([`BlockBackend::start_read`]), for `bufs`, the command's Data-In; with how many
/// bytes the answer places there. `None` (nothing done) for any other command, and for
/// a READ that needs anything else: a range or sense to report, a transfer that is not
/// whole blocks of the buffer, the LUN's I/O lock taken (a COMPARE AND WRITE), or a
/// backend that cannot; [`execute_data`] then serves it as before. The lock is not held
/// while the reads run: a READ beside a COMPARE AND WRITE of the same blocks returns the
/// old or the new data, as it would if either had come first.
pub fn start_read(
    lun: &LunState,
    cmd: &Command,
    bufs: &mut [&mut [u8]],
    be: &dyn BlockBackend,
) -> Option<(StartedRead, usize)> {
    let Command::Read { lba, blocks, .. } = *cmd else {
        return None;
    };
    if lun.capacity_changed.load(Ordering::Acquire) || lun.check_range(lba, blocks).is_err() {
        return None;
    }
    let bs = lun.cfg.block_size as u64;
    let room: usize = bufs.iter().map(|b| b.len()).sum();
    let len = cmd.transfer_length(bs).min(room as u64) as usize;
    if len == 0 || !(len as u64).is_multiple_of(bs) {
        return None;
    }
    let _held = lock(&lun.io, Access::Shared, false)?;
    // The first `len` bytes of the buffer.
    let mut pieces: Vec<&mut [u8]> = Vec::with_capacity(bufs.len());
    let mut left = len;
    for b in bufs.iter_mut() {
        if left == 0 {
            break;
        }
        let n = b.len().min(left);
        pieces.push(&mut b[..n]);
        left -= n;
    }
    let started = be.start_read(lba.offset(bs), &mut pieces)?;
    Some((started, len))
}

/// Parses and executes one command (waiting for the LUN's I/O lock and the backend),
/// its Data-Out in one buffer and its Data-In returned in [`ScsiResponse::data_in`].
pub fn execute(
    lun: &LunState,
    cdb_bytes: &[u8],
    data_out: &[u8],
    data_in_len: usize,
    be: &dyn BlockBackend,
) -> ScsiResponse {
    match Command::parse(cdb_bytes) {
        Ok(cmd) => execute_data(lun, &cmd, Data::Out(&[data_out], data_in_len), be),
        Err(s) => ScsiResponse::error(s),
    }
}

/// Executes a parsed command with its data in place ([`Data`]): a WRITE hands its
/// pieces to the backend, a READ given [`Data::In`] reads into them.
pub fn execute_data(
    lun: &LunState,
    cmd: &Command,
    data: Data<'_, '_>,
    be: &dyn BlockBackend,
) -> ScsiResponse {
    match run(lun, cmd, data, be, true) {
        Some(r) => r,
        // Only a non-waiting run gives up on the lock.
        None => ScsiResponse::internal_failure(),
    }
}

/// Executes one command; `None` when `wait` is false and the I/O lock is taken.
fn run(
    lun: &LunState,
    cmd: &Command,
    data: Data<'_, '_>,
    be: &dyn BlockBackend,
    wait: bool,
) -> Option<ScsiResponse> {
    let _held = lock(&lun.io, access(cmd), wait)?;
    Some(dispatch(lun, *cmd, data, be))
}

fn dispatch(
    lun: &LunState,
    cmd: Command,
    data: Data<'_, '_>,
    be: &dyn BlockBackend,
) -> ScsiResponse {
    let data_in_len = data.data_in_len();
    // A pending capacity change is reported once, before anything else, the way the
    // target core reports its own unit attentions.
    if !matches!(cmd, Command::Inquiry { .. } | Command::RequestSense { .. })
        && lun.capacity_changed.load(Ordering::Acquire)
        && lun.capacity_changed.swap(false, Ordering::AcqRel)
    {
        return ScsiResponse::error(sense::CAPACITY_DATA_CHANGED);
    }
    let cfg = &lun.cfg;
    let bs = cfg.block_size as u64;
    let num_blocks = lun.num_blocks();
    match cmd {
        Command::TestUnitReady | Command::StartStopUnit => ScsiResponse::good(Vec::new()),
        Command::RequestSense { alloc } => {
            // No pending sense is kept: report NO SENSE.
            ScsiResponse::good(truncate(sense::NO_SENSE.fixed(None), alloc))
        }
        Command::Inquiry { evpd, page, alloc } => match inquiry(cfg, evpd, page) {
            Some(d) => ScsiResponse::good(truncate(d, alloc)),
            None => ScsiResponse::error(sense::INVALID_FIELD_IN_CDB),
        },
        Command::ReadCapacity10 => {
            let last = num_blocks.saturating_sub(1).min(0xffff_ffff) as u32;
            let mut d = last.to_be_bytes().to_vec();
            d.extend_from_slice(&cfg.block_size.to_be_bytes());
            ScsiResponse::good(d)
        }
        Command::ReadCapacity16 { alloc } => {
            let mut d = vec![0u8; 32];
            d[0..8].copy_from_slice(&num_blocks.saturating_sub(1).to_be_bytes());
            d[8..12].copy_from_slice(&cfg.block_size.to_be_bytes());
            d[14] = 0x80 | 0x40; // LBPME, LBPRZ: unmapped blocks read as zeros
            ScsiResponse::good(truncate(d, alloc))
        }
        Command::ModeSense {
            page,
            subpage,
            pc,
            dbd,
            alloc,
            ten,
        } => mode_sense(lun, page, subpage, pc, dbd, ten)
            .map(|d| ScsiResponse::good(truncate(d, alloc)))
            .unwrap_or_else(|r| r),
        Command::ModeSelect { pf, sp, len, ten } => {
            mode_select(lun, pf, sp, len, ten, &data.contiguous())
        }
        Command::ReportLuns { alloc } => {
            let mut d = vec![0u8; 16];
            d[3] = 8;
            ScsiResponse::good(truncate(d, alloc))
        }
        Command::ReportOpcodes {
            options,
            opcode,
            sa,
            rctd,
            alloc,
        } => match report_opcodes(options, opcode, sa, rctd) {
            Ok(d) => ScsiResponse::good(truncate(d, alloc)),
            Err(r) => r,
        },
        Command::Read {
            lba,
            blocks,
            fua: _,
        } => {
            if let Err(r) = lun.check_range(lba, blocks) {
                return r;
            }
            // The initiator's buffer may be shorter than the CDB's transfer (overflow):
            // fill what fits, as LIO's own backstores do. The kernel learns the length
            // from what is filled; an overflow residual cannot be reported through
            // TCMU (`read_len` only shortens), so the initiator sees a full transfer of
            // its own length.
            let len = cmd.transfer_length(bs).min(data_in_len as u64);
            if len == 0 {
                return ScsiResponse::good(Vec::new());
            }
            match data {
                Data::In(bufs) => match read_in_place(be, lba.offset(bs), bufs, len as usize, bs) {
                    Ok(()) => ScsiResponse::placed(len as usize),
                    Err(e) => read_error(e, lba, bs),
                },
                Data::Out(..) => {
                    let mut buf = vec![0u8; (len.div_ceil(bs) * bs) as usize];
                    match be.read(lba.offset(bs), &mut [&mut buf[..]]) {
                        Ok(()) => {
                            buf.truncate(len as usize);
                            ScsiResponse::good(buf)
                        }
                        Err(e) => read_error(e, lba, bs),
                    }
                }
            }
        }
        Command::Write { lba, blocks, fua } => {
            if let Err(r) = lun.check_range(lba, blocks) {
                return r;
            }
            // Data-Out must be exactly what the CDB transfers (LIO refuses the same
            // mismatch for its own backstores with this sense).
            if data.out_len() != cmd.transfer_length(bs) {
                return ScsiResponse::error(sense::INVALID_FIELD_IN_IU);
            }
            if blocks.0 == 0 {
                return ScsiResponse::good(Vec::new());
            }
            let Data::Out(pieces, _) = data else {
                return ScsiResponse::error(sense::INVALID_FIELD_IN_IU);
            };
            write_or_error(be, lba, pieces, fua || !lun.write_cache(), bs)
        }
        Command::SyncCache { lba, blocks } => {
            if let Err(r) = lun.check_range(lba, blocks) {
                return r;
            }
            match be.flush() {
                Ok(()) => ScsiResponse::good(Vec::new()),
                Err(e) => e.response(Dir::Write, None, bs),
            }
        }
        Command::WriteSame {
            lba,
            blocks,
            unmap,
            ndob,
        } => write_same(lun, be, lba, blocks, unmap, ndob, &data.contiguous()),
        Command::Unmap { len } => unmap(lun, be, len, &data.contiguous()),
        Command::Verify { .. } => verify(lun, be, &cmd, &data.contiguous()),
        Command::WriteVerify {
            lba,
            blocks,
            bytchk,
        } => {
            if let Err(r) = lun.check_range(lba, blocks) {
                return r;
            }
            if data.out_len() != cmd.transfer_length(bs) {
                return ScsiResponse::error(sense::INVALID_FIELD_IN_IU);
            }
            if blocks.0 == 0 {
                return ScsiResponse::good(Vec::new());
            }
            // Compared as one buffer below (a rare command, written FUA and read back:
            // the copy is the least of its costs).
            let data_out = data.contiguous();
            // Written to the medium (durable), then read back from it.
            let r = write_or_error(be, lba, &[&data_out], true, bs);
            if r.status != GOOD {
                return r;
            }
            compare_range(be, lba, blocks, bs, |off, got| {
                if bytchk == WriteVerifyCheck::ReadBack {
                    return None;
                }
                let want = &data_out[off as usize..off as usize + got.len()];
                first_difference(got, want).map(|i| off + i as u64)
            })
        }
        Command::CompareAndWrite { lba, blocks, fua } => {
            compare_and_write(lun, be, lba, blocks, fua, &data.contiguous())
        }
        Command::GetLbaStatus {
            lba,
            alloc,
            report_type,
        } => get_lba_status(num_blocks, lba, alloc.min(data_in_len), report_type),
        // Takes the I/O locks of every LUN it names itself (Access::None here).
        Command::ExtendedCopy { len } => xcopy::extended_copy(lun, be, len, &data.contiguous()),
        Command::ReceiveCopyOperatingParameters { alloc } => {
            ScsiResponse::good(truncate(xcopy::operating_parameters(cfg), alloc))
        }
    }
}

/// Reads `len` bytes at `off` into the start of `bufs` (a READ's Data-In, which may be
/// shorter than the transfer): whole blocks straight into the pieces, a last partial
/// block (a Data-In that ends inside a block) through a one-block bounce.
fn read_in_place(
    be: &dyn BlockBackend,
    off: u64,
    bufs: &mut [&mut [u8]],
    len: usize,
    bs: u64,
) -> Result<(), IoError> {
    let whole = len - len % bs as usize;
    // The first `whole` bytes of the buffer, as pieces.
    let mut pieces: Vec<&mut [u8]> = Vec::with_capacity(bufs.len());
    let mut tail: Vec<&mut [u8]> = Vec::new();
    let mut at = 0;
    for b in bufs.iter_mut() {
        let b: &mut [u8] = b;
        let n = b.len().min(whole.saturating_sub(at));
        let (head, rest) = b.split_at_mut(n);
        if !head.is_empty() {
            pieces.push(head);
        }
        if at + n >= whole && !rest.is_empty() {
            tail.push(rest);
        }
        at += n;
    }
    if whole > 0 {
        be.read(off, &mut pieces)?;
    }
    if whole < len {
        let mut block = vec![0u8; bs as usize];
        be.read(off + whole as u64, &mut [&mut block[..]])?;
        let mut src = &block[..len - whole];
        for t in tail {
            let n = t.len().min(src.len());
            t[..n].copy_from_slice(&src[..n]);
            src = &src[n..];
        }
    }
    Ok(())
}

/// The sense for a failed read at the failing block (`lba` if unknown).
fn read_error(e: IoError, lba: Lba, bs: u64) -> ScsiResponse {
    e.response(Dir::Read, Some(lba), bs)
}

/// MISCOMPARE / MISCOMPARE DURING VERIFY OPERATION; INFORMATION holds the byte offset
/// of the first byte that differs (SBC-4 5.3, 5.29).
fn miscompare(offset: u64) -> ScsiResponse {
    ScsiResponse::check(sense::MISCOMPARE_DURING_VERIFY, Some(offset))
}

fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    a.iter().zip(b).position(|(x, y)| x != y)
}

/// Bytes read per step by the verify commands, so memory stays bounded whatever the
/// transfer length.
const VERIFY_CHUNK: u64 = 1 << 20;

/// Reads blocks `lba .. lba + blocks` in chunks, calling `cmp(offset in the range,
/// bytes)` for each; GOOD if every chunk reads and `cmp` finds nothing, MISCOMPARE at
/// the offset `cmp` returns, MEDIUM ERROR if a read fails.
fn compare_range(
    be: &dyn BlockBackend,
    lba: Lba,
    blocks: Blocks,
    bs: u64,
    mut cmp: impl FnMut(u64, &[u8]) -> Option<u64>,
) -> ScsiResponse {
    let per = (VERIFY_CHUNK / bs).max(1);
    let mut buf = vec![0u8; (per.min(blocks.0) * bs) as usize];
    let mut done = 0;
    while done < blocks.0 {
        let n = per.min(blocks.0 - done);
        let chunk = &mut buf[..(n * bs) as usize];
        let at = lba.after(Blocks(done));
        if let Err(e) = be.read(at.offset(bs), &mut [&mut *chunk]) {
            return read_error(e, at, bs);
        }
        if let Some(off) = cmp(done * bs, chunk) {
            return miscompare(off);
        }
        done += n;
    }
    ScsiResponse::good(Vec::new())
}

/// VERIFY (10/16): BYTCHK 0 reads the range back (MEDIUM ERROR if it cannot be read);
/// 1 compares it with the Data-Out; 3 compares every block with the one Data-Out
/// block. DPO (a cache hint) changes nothing here.
fn verify(lun: &LunState, be: &dyn BlockBackend, cmd: &Command, data_out: &[u8]) -> ScsiResponse {
    let bs = lun.cfg.block_size as u64;
    let Command::Verify {
        lba,
        blocks,
        bytchk,
    } = *cmd
    else {
        return ScsiResponse::internal_failure();
    };
    if let Err(r) = lun.check_range(lba, blocks) {
        return r;
    }
    if data_out.len() as u64 != cmd.transfer_length(bs) {
        return ScsiResponse::error(sense::INVALID_FIELD_IN_IU);
    }
    compare_range(be, lba, blocks, bs, |off, got| match bytchk {
        VerifyCheck::Medium => None,
        VerifyCheck::Compare => {
            first_difference(got, &data_out[off as usize..off as usize + got.len()])
                .map(|i| off + i as u64)
        }
        VerifyCheck::CompareOneBlock => got.chunks(bs as usize).enumerate().find_map(|(k, b)| {
            first_difference(b, data_out).map(|i| off + k as u64 * bs + i as u64)
        }),
    })
}

/// COMPARE AND WRITE (SBC-4 5.3): the Data-Out holds `blocks` blocks to compare, then
/// `blocks` blocks to write. Runs holding the LUN's I/O lock exclusively.
fn compare_and_write(
    lun: &LunState,
    be: &dyn BlockBackend,
    lba: Lba,
    blocks: Blocks,
    fua: bool,
    data_out: &[u8],
) -> ScsiResponse {
    let bs = lun.cfg.block_size as u64;
    // NUMBER OF LOGICAL BLOCKS 0: nothing compared or written, not an error.
    if blocks.0 == 0 {
        return if data_out.is_empty() {
            ScsiResponse::good(Vec::new())
        } else {
            ScsiResponse::error(sense::INVALID_FIELD_IN_IU)
        };
    }
    if blocks.0 > lun.cfg.max_compare_write_blocks as u64 {
        return ScsiResponse::error(sense::INVALID_FIELD_IN_CDB);
    }
    if let Err(r) = lun.check_range(lba, blocks) {
        return r;
    }
    let len = blocks.bytes(bs) as usize;
    if data_out.len() != 2 * len {
        return ScsiResponse::error(sense::INVALID_FIELD_IN_IU);
    }
    let (verify, write) = data_out.split_at(len);
    let mut cur = vec![0u8; len];
    if let Err(e) = be.read(lba.offset(bs), &mut [&mut cur[..]]) {
        return read_error(e, lba, bs);
    }
    if let Some(i) = first_difference(&cur, verify) {
        return miscompare(i as u64);
    }
    write_or_error(be, lba, &[write], fua || !lun.write_cache(), bs)
}

/// GET LBA STATUS (SBC-4 5.8). The engine keeps no map of deallocated blocks (a
/// discard drops cached lines and is passed to the backing device, which may or may
/// not deallocate), so every block is reported mapped: true in the sense that reads
/// return the medium's data, which after UNMAP is zeros (LBPRZ).
///
/// `room` is the allocation length or the Data-In buffer, whichever is shorter: the
/// descriptors built stop there (a capacity beyond 2^32 blocks takes several).
fn get_lba_status(num_blocks: u64, lba: Lba, room: usize, report_type: u8) -> ScsiResponse {
    if lba.0 >= num_blocks {
        return ScsiResponse::error(sense::LBA_OUT_OF_RANGE);
    }
    // Every block is mapped: reported for the types that include mapped blocks.
    let mapped_wanted = match ReportType::try_from(report_type) {
        Ok(ReportType::All | ReportType::Mapped) => true,
        Ok(ReportType::NonzeroStatus | ReportType::Deallocated | ReportType::Anchored) => false,
        Err(s) => return ScsiResponse::error(s),
    };
    let mut d = vec![0u8; 8];
    d[7] = 0x01; // RTP: the REPORT TYPE field was processed
    let mut next = lba.0;
    while mapped_wanted && next < num_blocks && d.len() < room.max(24) {
        let n = (num_blocks - next).min(u32::MAX as u64);
        let mut desc = [0u8; 16];
        desc[0..8].copy_from_slice(&next.to_be_bytes());
        desc[8..12].copy_from_slice(&(n as u32).to_be_bytes());
        desc[12] = 0x00; // PROVISIONING STATUS: mapped
        d.extend_from_slice(&desc);
        next += n;
    }
    let n = (d.len() - 4) as u32;
    d[0..4].copy_from_slice(&n.to_be_bytes());
    ScsiResponse::good(truncate(d, room))
}

/// Writes `data` at block `lba`: GOOD, or the sense of the failure.
fn write_or_error(
    be: &dyn BlockBackend,
    lba: Lba,
    data: &[&[u8]],
    fua: bool,
    bs: u64,
) -> ScsiResponse {
    match be.write(lba.offset(bs), data, fua) {
        Ok(()) => ScsiResponse::good(Vec::new()),
        Err(e) => e.response(Dir::Write, Some(lba), bs),
    }
}

/// VERSION DESCRIPTORs of the standard INQUIRY data (SPC-4 table 144): the standards
/// this emulation follows, so an initiator knows to read the Block Limits page.
pub const VERSION_DESCRIPTORS: [u16; 3] = [
    0x00a0, // SAM-5 (no version claimed)
    0x0460, // SPC-4 (no version claimed)
    0x04c0, // SBC-3 (no version claimed)
];

fn inquiry(cfg: &LunConfig, evpd: bool, page: u8) -> Option<Vec<u8>> {
    if !evpd {
        let mut d = vec![0u8; 96];
        d[2] = 0x06; // SPC-4
        d[3] = 0x12; // HiSup, response data format 2
        d[4] = 91;
        d[5] = 0x08; // 3PC: EXTENDED COPY
        d[7] = 0x02; // CmdQue
        d[8..16].copy_from_slice(&pad(&cfg.vendor, 8));
        d[16..32].copy_from_slice(&pad(&cfg.product, 16));
        d[32..36].copy_from_slice(&pad(&cfg.revision, 4));
        for (i, v) in VERSION_DESCRIPTORS.iter().enumerate() {
            d[58 + 2 * i..60 + 2 * i].copy_from_slice(&v.to_be_bytes());
        }
        return Some(d);
    }
    let body: Vec<u8> = match page {
        0x00 => vec![0x00, 0x80, 0x83, 0x8f, 0xb0, 0xb1, 0xb2],
        0x8f => xcopy::vpd_8f(cfg),
        0x80 => cfg
            .serial
            .bytes()
            .filter(|b| (0x20..0x7f).contains(b))
            .take(250)
            .collect(),
        0x83 => {
            let mut v = Vec::new();
            v.extend_from_slice(&[0x01, 0x03, 0x00, 16]);
            v.extend_from_slice(&naa(cfg));
            // T10 vendor id designator: vendor + serial.
            let mut t10 = pad(&cfg.vendor, 8);
            t10.extend(
                cfg.serial
                    .bytes()
                    .filter(|b| (0x20..0x7f).contains(b))
                    .take(200),
            );
            v.extend_from_slice(&[0x02, 0x01, 0x00, t10.len() as u8]);
            v.extend_from_slice(&t10);
            v
        }
        0xb0 => {
            let mut v = vec![0u8; 0x3c];
            v[0] = 0x01; // WSNZ: WRITE SAME with 0 blocks is refused
            v[1] = cfg.max_compare_write_blocks;
            v[2..4].copy_from_slice(&((4096 / cfg.block_size).max(1) as u16).to_be_bytes());
            v[4..8].copy_from_slice(&cfg.max_transfer_blocks.to_be_bytes());
            let opt = cfg.opt_transfer_blocks.min(cfg.max_transfer_blocks);
            v[8..12].copy_from_slice(&opt.to_be_bytes());
            v[16..20].copy_from_slice(&cfg.max_unmap_blocks.to_be_bytes());
            v[20..24].copy_from_slice(&cfg.max_unmap_descriptors.to_be_bytes());
            v[24..28].copy_from_slice(&(4096 / cfg.block_size).max(1).to_be_bytes());
            v[28..32].copy_from_slice(&0x8000_0000u32.to_be_bytes()); // UGAVALID, alignment 0
            v[32..40].copy_from_slice(&(cfg.max_unmap_blocks as u64).to_be_bytes());
            v
        }
        0xb1 => {
            let mut v = vec![0u8; 0x3c];
            v[0..2].copy_from_slice(&cfg.rotation_rate.to_be_bytes());
            v
        }
        0xb2 => vec![0x00, 0x80 | 0x40 | 0x20 | 0x04, 0x00, 0x00], // LBPU, LBPWS, LBPWS10, LBPRZ
        _ => return None,
    };
    let mut d = vec![0x00, page];
    d.extend_from_slice(&(body.len() as u16).to_be_bytes());
    d.extend_from_slice(&body);
    Some(d)
}

/// The LUN's NAA IEEE Registered Extended (6) designator (VPD 0x83): a stable id
/// derived from the serial; EXTENDED COPY names its copy targets with it.
pub fn naa(cfg: &LunConfig) -> [u8; 16] {
    let h = crc32c_like(cfg.serial.as_bytes());
    let mut naa = [0u8; 16];
    naa[0] = 0x60 | 0x01; // NAA 6, OUI 0x001405 (LIO's) upper nibble
    naa[1] = 0x40;
    naa[2] = 0x50;
    naa[3..11].copy_from_slice(&h.to_be_bytes());
    naa[11..15].copy_from_slice(&(h as u32 ^ 0x5a5a_5a5a).to_be_bytes());
    naa
}

/// A small deterministic hash for the NAA identifier (FNV-1a 64).
fn crc32c_like(b: &[u8]) -> u64 {
    b.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &x| {
        (h ^ x as u64).wrapping_mul(0x100_0000_01b3)
    })
}

fn caching_page(wce: bool, changeable: bool) -> Vec<u8> {
    let mut p = vec![0u8; 20];
    p[0] = 0x08;
    p[1] = 0x12;
    if changeable || wce {
        p[2] = 0x04;
    }
    p
}

fn control_page(changeable: bool) -> Vec<u8> {
    let mut p = vec![0u8; 12];
    p[0] = 0x0a;
    p[1] = 0x0a;
    if !changeable {
        p[2] = 0x00; // TST 0, D_SENSE 0: fixed-format sense
        p[3] = 0x10; // QUEUE ALGORITHM MODIFIER 1: unrestricted reordering
    }
    p
}

fn mode_sense(
    lun: &LunState,
    page: u8,
    subpage: u8,
    pc: PageControl,
    dbd: bool,
    ten: bool,
) -> Result<Vec<u8>, ScsiResponse> {
    if pc == PageControl::Saved {
        return Err(ScsiResponse::error(sense::SAVING_PARAMETERS_NOT_SUPPORTED));
    }
    if subpage != 0 && !(page == 0x3f && subpage == 0xff) {
        return Err(ScsiResponse::error(sense::INVALID_FIELD_IN_CDB));
    }
    let changeable = pc == PageControl::Changeable;
    let wce = if pc == PageControl::Default {
        true
    } else {
        lun.write_cache()
    };
    let mut pages = Vec::new();
    match page {
        0x08 => pages.extend(caching_page(wce, changeable)),
        0x0a => pages.extend(control_page(changeable)),
        0x3f => {
            pages.extend(caching_page(wce, changeable));
            pages.extend(control_page(changeable));
        }
        _ => return Err(ScsiResponse::error(sense::INVALID_FIELD_IN_CDB)),
    }
    let cfg = &lun.cfg;
    let mut bd = Vec::new();
    if !dbd {
        bd = vec![0u8; 8];
        let n = lun.num_blocks().min(0xff_ffff) as u32;
        bd[1..4].copy_from_slice(&n.to_be_bytes()[1..4]);
        bd[5..8].copy_from_slice(&cfg.block_size.to_be_bytes()[1..4]);
        if changeable {
            bd.fill(0);
        }
    }
    let dev_specific = 0x10; // DPOFUA: FUA is honoured
    let mut d = if ten {
        let mut h = vec![0u8; 8];
        let len = (6 + bd.len() + pages.len()) as u16;
        h[0..2].copy_from_slice(&len.to_be_bytes());
        h[3] = dev_specific;
        h[6..8].copy_from_slice(&(bd.len() as u16).to_be_bytes());
        h
    } else {
        vec![
            (3 + bd.len() + pages.len()) as u8,
            0,
            dev_specific,
            bd.len() as u8,
        ]
    };
    d.extend(bd);
    d.extend(pages);
    Ok(d)
}

fn mode_select(
    lun: &LunState,
    pf: bool,
    sp: bool,
    len: usize,
    ten: bool,
    data: &[u8],
) -> ScsiResponse {
    if !pf || sp {
        // Only SPC page format, and nothing can be saved.
        return ScsiResponse::error(if sp {
            sense::SAVING_PARAMETERS_NOT_SUPPORTED
        } else {
            sense::INVALID_FIELD_IN_CDB
        });
    }
    if data.len() != len {
        return ScsiResponse::error(sense::PARAMETER_LIST_LENGTH_ERROR);
    }
    if len == 0 {
        return ScsiResponse::good(Vec::new());
    }
    let (hl, bdl) = if ten {
        if len < 8 {
            return ScsiResponse::error(sense::PARAMETER_LIST_LENGTH_ERROR);
        }
        (8, u16::from_be_bytes([data[6], data[7]]) as usize)
    } else {
        if len < 4 {
            return ScsiResponse::error(sense::PARAMETER_LIST_LENGTH_ERROR);
        }
        (4, data[3] as usize)
    };
    let mut p = hl + bdl;
    if p > len {
        return ScsiResponse::error(sense::PARAMETER_LIST_LENGTH_ERROR);
    }
    let mut new_wce = lun.write_cache();
    while p < len {
        if p + 2 > len {
            return ScsiResponse::error(sense::PARAMETER_LIST_LENGTH_ERROR);
        }
        let code = data[p] & 0x3f;
        let plen = data[p + 1] as usize + 2;
        if data[p] & 0x40 != 0 || p + plen > len {
            return ScsiResponse::error(sense::INVALID_FIELD_IN_PARAMETER_LIST);
        }
        let page = &data[p..p + plen];
        match code {
            0x08 if plen == 20 => {
                // Only WCE may change; every other byte must equal the current page.
                let cur = caching_page(false, false);
                let differs = page.iter().zip(&cur).enumerate().any(|(i, (a, b))| {
                    if i == 2 {
                        a & !0x04 != *b
                    } else {
                        a != b
                    }
                });
                if differs {
                    return ScsiResponse::error(sense::INVALID_FIELD_IN_PARAMETER_LIST);
                }
                new_wce = page[2] & 0x04 != 0;
            }
            0x0a if page == control_page(false).as_slice() => {}
            _ => return ScsiResponse::error(sense::INVALID_FIELD_IN_PARAMETER_LIST),
        }
        p += plen;
    }
    lun.wce.store(new_wce, Ordering::Relaxed);
    ScsiResponse::good(Vec::new())
}

/// The command timeouts descriptor (SPC-4 6.35.4): no nominal time is promised; the
/// recommended timeout is the kernel's default `cmd_time_out` (30 s), after which LIO
/// fails a user-backstore command itself.
const RECOMMENDED_TIMEOUT_S: u32 = 30;

fn timeouts_descriptor() -> [u8; 12] {
    let mut t = [0u8; 12];
    t[1] = 0x0a; // DESCRIPTOR LENGTH
    t[8..12].copy_from_slice(&RECOMMENDED_TIMEOUT_S.to_be_bytes());
    t
}

fn report_opcodes(options: u8, opcode: u8, sa: u16, rctd: bool) -> Result<Vec<u8>, ScsiResponse> {
    let by_opcode = || SUPPORTED.iter().filter(move |s| s.opcode == opcode);
    let has_sa = by_opcode().any(|s| s.sa.is_some());
    let options = match ReportingOptions::try_from(options) {
        Ok(o) => o,
        Err(s) => return Err(ScsiResponse::error(s)),
    };
    let found = match options {
        ReportingOptions::All => {
            let mut d = vec![0u8; 4];
            for s in SUPPORTED {
                let mut desc = vec![s.opcode, 0, 0, 0, 0, 0, 0, 0];
                if let Some(sa) = s.sa {
                    desc[2..4].copy_from_slice(&sa.to_be_bytes());
                    desc[5] |= 0x01; // SERVACTV
                }
                if rctd {
                    desc[5] |= 0x02; // CTDP
                }
                desc[6..8].copy_from_slice(&(s.usage.len() as u16).to_be_bytes());
                d.extend(desc);
                if rctd {
                    d.extend(timeouts_descriptor());
                }
            }
            let n = (d.len() - 4) as u32;
            d[0..4].copy_from_slice(&n.to_be_bytes());
            return Ok(d);
        }
        // One command by opcode: an error for an opcode that has service actions.
        ReportingOptions::Opcode if has_sa => {
            return Err(ScsiResponse::error(sense::INVALID_FIELD_IN_CDB))
        }
        ReportingOptions::Opcode => by_opcode().next(),
        // One command by opcode and service action: an error for a supported opcode
        // without service actions.
        ReportingOptions::OpcodeAndServiceAction if !has_sa && by_opcode().next().is_some() => {
            return Err(ScsiResponse::error(sense::INVALID_FIELD_IN_CDB))
        }
        ReportingOptions::OpcodeAndServiceAction => by_opcode().find(|s| s.sa == Some(sa)),
        // Either: the service action counts only for opcodes that have them.
        ReportingOptions::Either => by_opcode().find(|s| s.sa.is_none() || s.sa == Some(sa)),
    };
    let mut d = vec![0u8; 4];
    match found {
        Some(s) => {
            d[1] = 0x03; // SUPPORT: supported, per standard
            if rctd {
                d[1] |= 0x80; // CTDP
            }
            d[2..4].copy_from_slice(&(s.usage.len() as u16).to_be_bytes());
            d.extend_from_slice(s.usage);
            if rctd {
                d.extend(timeouts_descriptor());
            }
        }
        None => d[1] = 0x01, // SUPPORT: not supported
    }
    Ok(d)
}

#[allow(clippy::too_many_arguments)]
fn write_same(
    lun: &LunState,
    be: &dyn BlockBackend,
    lba: Lba,
    blocks: Blocks,
    unmap: bool,
    ndob: bool,
    data: &[u8],
) -> ScsiResponse {
    let cfg = &lun.cfg;
    let bs = cfg.block_size as u64;
    if blocks.0 == 0 || blocks.0 > cfg.max_unmap_blocks as u64 {
        return ScsiResponse::error(sense::INVALID_FIELD_IN_CDB);
    }
    if let Err(r) = lun.check_range(lba, blocks) {
        return r;
    }
    let block: Vec<u8> = if ndob {
        if !data.is_empty() {
            return ScsiResponse::error(sense::INVALID_FIELD_IN_CDB);
        }
        vec![0u8; bs as usize]
    } else {
        if data.len() as u64 != bs {
            return ScsiResponse::error(sense::INVALID_FIELD_IN_CDB);
        }
        data.to_vec()
    };
    if unmap && block.iter().all(|&b| b == 0) {
        // Unmapped blocks read as zeros (LBPRZ), so the discard is the write.
        return match be.discard(lba.offset(bs), blocks.bytes(bs)) {
            Ok(()) => ScsiResponse::good(Vec::new()),
            Err(e) => e.response(Dir::Write, Some(lba), bs),
        };
    }
    // Replicate in chunks of at most 1 MiB.
    let per = ((1u64 << 20) / bs).max(1);
    let chunk: Vec<u8> = block.repeat(per.min(blocks.0) as usize);
    let mut done = 0;
    while done < blocks.0 {
        let n = per.min(blocks.0 - done);
        let r = write_or_error(
            be,
            lba.after(Blocks(done)),
            &[&chunk[..(n * bs) as usize]],
            !lun.write_cache(),
            bs,
        );
        if r.status != GOOD {
            return r;
        }
        done += n;
    }
    ScsiResponse::good(Vec::new())
}

fn unmap(lun: &LunState, be: &dyn BlockBackend, len: usize, data: &[u8]) -> ScsiResponse {
    let cfg = &lun.cfg;
    let bs = cfg.block_size as u64;
    if len == 0 {
        return ScsiResponse::good(Vec::new());
    }
    if data.len() != len || len < 8 {
        return ScsiResponse::error(sense::PARAMETER_LIST_LENGTH_ERROR);
    }
    let bd_len = u16::from_be_bytes([data[2], data[3]]) as usize;
    if !bd_len.is_multiple_of(16) || 8 + bd_len > len {
        return ScsiResponse::error(sense::PARAMETER_LIST_LENGTH_ERROR);
    }
    let n = bd_len / 16;
    if n > cfg.max_unmap_descriptors as usize {
        return ScsiResponse::error(sense::INVALID_FIELD_IN_PARAMETER_LIST);
    }
    let descs: Vec<(Lba, Blocks)> = (0..n)
        .map(|i| {
            let d = &data[8 + 16 * i..24 + 16 * i];
            (
                Lba(u64::from_be_bytes(d[0..8].try_into().expect("8"))),
                Blocks(u32::from_be_bytes(d[8..12].try_into().expect("4")) as u64),
            )
        })
        .collect();
    // Validate every descriptor before touching any data.
    for &(lba, count) in &descs {
        if count.0 > cfg.max_unmap_blocks as u64 {
            return ScsiResponse::error(sense::INVALID_FIELD_IN_PARAMETER_LIST);
        }
        if let Err(r) = lun.check_range(lba, count) {
            return r;
        }
    }
    for (lba, count) in descs {
        if count.0 == 0 {
            continue;
        }
        if let Err(e) = be.discard(lba.offset(bs), count.bytes(bs)) {
            return e.response(Dir::Write, Some(lba), bs);
        }
    }
    ScsiResponse::good(Vec::new())
}

#[cfg(test)]
mod tests;
