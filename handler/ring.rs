//! The TCMU command ring (`docs/TCMU.md` §1): mailbox validation, fetching entries from
//! our tail to `cmd_head`, lending a command's iovecs over the data area as slices
//! ([`Ring::lend`]: the cache engine copies Data-Out from them and reads Data-In into
//! them, once), and completing commands — in ring order, or out of order when the kernel
//! offers `CAP_OOOC` (the "steal the slot at the tail" scheme of §1.10).
//!
//! [`Queue`] is the state machine, indices only, taking the memory it works on at every
//! call (the device's mapping, or a heap buffer in tests and fuzzing); [`Ring`] binds
//! one to the memory of a device. The layout comes from the bindings of `sys/`
//! (`offset_of!`).
//!
//! Safe code over [`SharedMap`]: every offset the kernel hands us (entry lengths,
//! `cdb_off`, iovecs) is validated before use, and a malformed entry is a
//! [`RingError`] that makes the caller stop serving the device, never an out-of-bounds
//! access.

use std::collections::VecDeque;
use std::io;
use std::os::fd::RawFd;

use std::sync::Arc;

use crate::shm::{Lent, SharedMap, ShmError};
use crate::sys;

/// Byte offsets inside the mailbox and entries, taken from the bindings of `sys/`
/// (whose layout tests pin them to the kernel's).
pub(crate) mod off {
    use crate::sys::{
        iovec, tcmu_cmd_entry, tcmu_cmd_entry__bindgen_ty_1 as Body,
        tcmu_cmd_entry__bindgen_ty_1__bindgen_ty_1 as Req,
        tcmu_cmd_entry__bindgen_ty_1__bindgen_ty_2 as Rsp, tcmu_cmd_entry_hdr as Hdr,
        tcmu_mailbox as Mb, tcmu_tmr_entry as TmrEntry,
    };
    use std::mem::{offset_of, size_of};

    pub const MB_VERSION: u64 = offset_of!(Mb, version) as u64;
    pub const MB_FLAGS: u64 = offset_of!(Mb, flags) as u64;
    pub const MB_CMDR_OFF: u64 = offset_of!(Mb, cmdr_off) as u64;
    pub const MB_CMDR_SIZE: u64 = offset_of!(Mb, cmdr_size) as u64;
    pub const MB_CMD_HEAD: u64 = offset_of!(Mb, cmd_head) as u64;
    pub const MB_CMD_TAIL: u64 = offset_of!(Mb, cmd_tail) as u64;
    pub const HDR_LEN_OP: u64 = offset_of!(Hdr, len_op) as u64;
    pub const HDR_CMD_ID: u64 = offset_of!(Hdr, cmd_id) as u64;
    pub const HDR_UFLAGS: u64 = offset_of!(Hdr, uflags) as u64;
    /// Where the request/response union starts in an entry.
    const BODY: u64 = offset_of!(tcmu_cmd_entry, __bindgen_anon_1) as u64;
    const REQ: u64 = BODY + offset_of!(Body, req) as u64;
    const RSP: u64 = BODY + offset_of!(Body, rsp) as u64;
    pub const REQ_IOV_CNT: u64 = REQ + offset_of!(Req, iov_cnt) as u64;
    pub const REQ_IOV_BIDI_CNT: u64 = REQ + offset_of!(Req, iov_bidi_cnt) as u64;
    pub const REQ_CDB_OFF: u64 = REQ + offset_of!(Req, cdb_off) as u64;
    pub const REQ_IOV: u64 = REQ + offset_of!(Req, iov) as u64;
    /// Size of one iovec in the entry, and where its fields are.
    pub const IOV_SIZE: u64 = size_of::<iovec>() as u64;
    pub const IOV_BASE: u64 = offset_of!(iovec, iov_base) as u64;
    pub const IOV_LEN: u64 = offset_of!(iovec, iov_len) as u64;
    pub const RSP_STATUS: u64 = RSP + offset_of!(Rsp, scsi_status) as u64;
    pub const RSP_READ_LEN: u64 = RSP + offset_of!(Rsp, read_len) as u64;
    pub const RSP_SENSE: u64 = RSP + offset_of!(Rsp, sense_buffer) as u64;
    pub const TMR_TYPE: u64 = offset_of!(TmrEntry, tmr_type) as u64;
    pub const TMR_CMD_CNT: u64 = offset_of!(TmrEntry, cmd_cnt) as u64;
    pub const TMR_CMD_IDS: u64 = offset_of!(TmrEntry, cmd_ids) as u64;
}

/// Size of the mailbox at the start of the map.
pub const MAILBOX_SIZE: u64 = size_of::<sys::tcmu_mailbox>() as u64;
/// Size of a command entry without extra iovecs.
pub const CMD_ENTRY_SIZE: u64 = size_of::<sys::tcmu_cmd_entry>() as u64;
/// Bytes of sense data in a response.
pub const SENSE_SIZE: usize = sys::TCMU_SENSE_BUFFERSIZE as usize;
/// Largest CDB the SCSI core passes (`SCSI_MAX_VARLEN_CDB_SIZE`).
pub const MAX_CDB: usize = 260;

/// What is wrong with one entry the kernel wrote.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EntryFault {
    /// The entry's length is 0, not a multiple of 8, runs past `cmd_head` or past the
    /// end of the ring: the next entry cannot be found.
    #[error("length {len} (head {head})")]
    Length {
        /// The length in the header.
        len: u32,
        /// `cmd_head` when it was read.
        head: u32,
    },
    /// A command id that is already outstanding on the ring.
    #[error("command id {0} already outstanding")]
    DuplicateId(u16),
    /// More iovecs than the entry can hold.
    #[error("{iov_cnt}+{bidi_cnt} iovecs do not fit {len} bytes")]
    TooManyIovecs {
        /// `iov_cnt`.
        iov_cnt: u32,
        /// `iov_bidi_cnt`.
        bidi_cnt: u32,
        /// Entry length.
        len: u32,
    },
    /// An iovec not inside the data area.
    #[error("iovec {base}+{len} outside the data area")]
    IovecOutside {
        /// `iov_base` (offset from the map start).
        base: u64,
        /// `iov_len`.
        len: u64,
    },
    /// Two iovecs share bytes.
    #[error("iovecs {a}+{a_len} and {b}+{b_len} overlap")]
    IovecOverlap {
        /// First iovec's offset.
        a: u64,
        /// Its length.
        a_len: u64,
        /// Second iovec's offset.
        b: u64,
        /// Its length.
        b_len: u64,
    },
    /// `cdb_off` does not point into the entry after its iovecs.
    #[error("cdb_off {0} outside the entry")]
    CdbOutside(u64),
    /// The CDB is longer than what the entry holds (or than any CDB).
    #[error("CDB of {len} bytes, {avail} available")]
    CdbTooLong {
        /// Length from the opcode.
        len: usize,
        /// Bytes the entry holds from `cdb_off`.
        avail: usize,
    },
    /// No opcode byte.
    #[error("CDB truncated")]
    CdbTruncated,
    /// A TMR entry shorter than its header.
    #[error("TMR entry too short")]
    TmrTooShort,
    /// A TMR entry listing more ids than it holds.
    #[error("TMR with {ids} ids does not fit {len} bytes")]
    TmrIds {
        /// `cmd_cnt`.
        ids: u64,
        /// Entry length.
        len: u32,
    },
}

/// A ring that cannot be served as it is (or a failed completion).
#[derive(Debug, thiserror::Error)]
pub enum RingError {
    /// The mailbox is not one we can serve.
    #[error("mailbox: {0}")]
    Mailbox(String),
    /// An entry the kernel wrote is inconsistent in a way that loses the ring's
    /// framing (its length, or a duplicate id): nothing after it can be trusted.
    #[error("entry at ring offset {offset}: {fault}")]
    Entry {
        /// Ring offset of the entry.
        offset: u32,
        /// What is wrong.
        fault: EntryFault,
    },
    /// An access fell outside the mapping, or the mapping is gone (SIGBUS).
    #[error(transparent)]
    Shm(#[from] ShmError),
    /// A completion for a command id that is not outstanding.
    #[error("completion for unknown command id {0}")]
    UnknownId(u16),
}

impl RingError {
    /// The mapping itself is gone: the device cannot be served any more, and a ring
    /// reset cannot help.
    pub fn is_gone(&self) -> bool {
        matches!(self, RingError::Shm(ShmError::Gone))
    }
}

/// One iovec of a command, as offsets into the map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IoVec {
    /// Offset from the map start (inside the data area).
    pub off: u64,
    /// Length in bytes.
    pub len: u64,
}

/// A SCSI command fetched from the ring, copied out of shared memory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Command {
    /// The kernel's id for the command.
    pub cmd_id: u16,
    /// The CDB.
    pub cdb: Vec<u8>,
    /// Data-Out or Data-In iovecs.
    pub iovs: Vec<IoVec>,
    /// Extra Data-In iovecs of a bidirectional command.
    pub bidi_iovs: Vec<IoVec>,
}

impl Command {
    /// Total length of `iovs`.
    pub fn data_len(&self) -> u64 {
        self.iovs.iter().map(|v| v.len).sum()
    }
}

/// A task-management notification (`TCMU_OP_TMR`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tmr {
    /// `tcmu_tmr_type`.
    pub tmr_type: u8,
    /// Ids of aborted commands still on the ring.
    pub cmd_ids: Vec<u16>,
}

/// An entry refused on its own: its length is sound, so the ring stays usable.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Malformed {
    /// Ring offset of the entry.
    pub offset: u32,
    /// The command id to complete (with CHECK CONDITION), for a CMD entry; `None` for
    /// a TMR entry, which is skipped.
    pub cmd_id: Option<u16>,
    /// What is wrong.
    pub fault: EntryFault,
}

/// What [`Ring::fetch`] returns.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fetched {
    /// A command to execute and complete.
    Cmd(Command),
    /// A task-management notification (already consumed; no completion).
    Tmr(Tmr),
    /// A malformed entry; a CMD must still be completed (with an error status).
    Malformed(Malformed),
}

/// A command's response.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Response {
    /// SAM status (GOOD 0, CHECK CONDITION 2, ...).
    pub status: u8,
    /// Sense data for CHECK CONDITION (fixed format, up to 96 bytes).
    pub sense: Vec<u8>,
    /// Bytes of Data-In actually produced, if fewer than the iovecs hold
    /// (reported with `TCMU_UFLAG_READ_LEN` when the kernel supports it).
    pub read_len: Option<u32>,
}

/// How the handler is told of new entries and tells the kernel of completions.
pub trait Doorbell: Send {
    /// The descriptor to poll for readability.
    fn fd(&self) -> RawFd;
    /// Clears the pending event (before scanning the ring).
    fn ack(&self) -> io::Result<()>;
    /// Tells the kernel the tail moved.
    fn kick(&self) -> io::Result<()>;
    /// Has the kernel reset the ring (`action/reset_ring`, `docs/TCMU.md` §3.5):
    /// every outstanding command is completed to its initiator with BUSY and
    /// `cmd_head` = `cmd_tail` = 0. Only while no command of the ring is being
    /// executed. `Ok(false)` when this kernel (or doorbell) cannot.
    fn reset_ring(&self) -> io::Result<bool> {
        Ok(false)
    }
}

#[derive(Debug)]
struct Slot {
    off: u32,
    len: u32,
    /// Command id for CMD slots, None for PAD/TMR/unknown (skipped on completion).
    cmd: Option<u16>,
    /// In-order mode: the response, once the command completed.
    done: Option<Response>,
}

/// The ring's state machine: where the ring is, our fetch position and published tail,
/// and the entries fetched and not yet passed. It holds no memory: every call takes the
/// memory it works on (the `virtio-queue` way), so the same code runs over a device's
/// mapping, a heap buffer ([`SharedMap::heap`]), the kernel emulator and the fuzzers.
/// [`Ring`] binds one to the memory of one device.
#[derive(Debug)]
pub struct Queue {
    cmdr_off: u64,
    cmdr_size: u32,
    data_off: u64,
    flags: u16,
    /// Where our next fetch starts (ring offset).
    fetch_tail: u32,
    /// The `cmd_tail` we last published.
    tail: u32,
    /// Fetched entries not yet passed by the tail, in ring order.
    slots: VecDeque<Slot>,
    /// Completions written since the last [`Queue::publish`].
    moved: bool,
}

/// The command ring of one device: a [`Queue`] over the device's memory, which it owns
/// (shared with the loans it hands out).
pub struct Ring {
    mem: Arc<SharedMap>,
    q: Queue,
}

fn entry_err(offset: u32, fault: EntryFault) -> RingError {
    RingError::Entry { offset, fault }
}

/// The first pair of iovecs sharing a byte, if any (empty iovecs share nothing).
fn overlap(iovs: &[IoVec]) -> Option<EntryFault> {
    let mut sorted: Vec<&IoVec> = iovs.iter().filter(|v| v.len > 0).collect();
    sorted.sort_unstable_by_key(|v| v.off);
    sorted.windows(2).find_map(|w| {
        (w[0].off + w[0].len > w[1].off).then_some(EntryFault::IovecOverlap {
            a: w[0].off,
            a_len: w[0].len,
            b: w[1].off,
            b_len: w[1].len,
        })
    })
}

/// Length of a CDB from its opcode (`scsi_command_size`), reading byte 7 for
/// variable-length CDBs (0x7f).
pub fn cdb_len(cdb_head: &[u8]) -> Option<usize> {
    let op = *cdb_head.first()?;
    if op == 0x7f {
        return cdb_head.get(7).map(|&n| 8 + n as usize);
    }
    Some(match op >> 5 {
        0 => 6,
        1 | 2 => 10,
        3 | 5 => 12,
        4 => 16,
        _ => 10,
    })
}

impl Queue {
    /// Validates the mailbox in `mem` and takes over the ring at the current `cmd_tail`.
    pub fn new(mem: &SharedMap) -> Result<Queue, RingError> {
        let version = mem.read_u16(off::MB_VERSION)?;
        if version as u32 != sys::TCMU_MAILBOX_VERSION {
            return Err(RingError::Mailbox(format!(
                "version {version}, lc speaks version {}",
                sys::TCMU_MAILBOX_VERSION
            )));
        }
        let flags = mem.read_u16(off::MB_FLAGS)?;
        let cmdr_off = mem.read_u32(off::MB_CMDR_OFF)? as u64;
        let cmdr_size = mem.read_u32(off::MB_CMDR_SIZE)?;
        let data_off = cmdr_off + cmdr_size as u64;
        if cmdr_off < MAILBOX_SIZE
            || !cmdr_off.is_multiple_of(8)
            || cmdr_size < 64
            || cmdr_size % 8 != 0
            || data_off > mem.len() as u64
        {
            return Err(RingError::Mailbox(format!(
                "ring at {cmdr_off}+{cmdr_size} does not fit the {}-byte map",
                mem.len()
            )));
        }
        let tail = mem.read_u32(off::MB_CMD_TAIL)?;
        if tail >= cmdr_size || tail % 8 != 0 {
            return Err(RingError::Mailbox(format!("cmd_tail {tail} invalid")));
        }
        Ok(Queue {
            cmdr_off,
            cmdr_size,
            data_off,
            flags,
            fetch_tail: tail,
            tail,
            slots: VecDeque::new(),
            moved: false,
        })
    }

    /// Where the data area starts (offset from the start of the memory).
    pub fn data_off(&self) -> u64 {
        self.data_off
    }

    /// "head H tail T size S flags F", for logs.
    pub fn describe(&self, mem: &SharedMap) -> String {
        let head = mem.load_acquire_u32(off::MB_CMD_HEAD).unwrap_or(u32::MAX);
        format!(
            "head {head} tail {} size {} flags {:#x}",
            self.tail, self.cmdr_size, self.flags
        )
    }

    /// Mailbox capability flags.
    pub fn flags(&self) -> u16 {
        self.flags
    }

    /// True when the kernel accepts out-of-order completions.
    pub fn out_of_order(&self) -> bool {
        self.flags as u32 & sys::TCMU_MAILBOX_FLAG_CAP_OOOC != 0
    }

    /// Commands fetched and not yet completed.
    pub fn outstanding(&self) -> usize {
        self.slots
            .iter()
            .filter(|s| s.cmd.is_some() && s.done.is_none())
            .count()
    }

    fn abs(&self, ring_off: u32) -> u64 {
        self.cmdr_off + ring_off as u64
    }

    fn iovec(&self, mem: &SharedMap, at: u64) -> Result<Result<IoVec, EntryFault>, ShmError> {
        let base = mem.read_u64(at + off::IOV_BASE)?;
        let len = mem.read_u64(at + off::IOV_LEN)?;
        Ok(match base.checked_add(len) {
            Some(end) if base >= self.data_off && end <= mem.len() as u64 => {
                Ok(IoVec { off: base, len })
            }
            _ => Err(EntryFault::IovecOutside { base, len }),
        })
    }

    /// Whether the kernel queued entries not fetched yet (one shared-memory load).
    pub fn pending(&self, mem: &SharedMap) -> bool {
        mem.load_acquire_u32(off::MB_CMD_HEAD)
            .is_ok_and(|head| head != self.fetch_tail)
    }

    /// Fetches every entry between our tail and `cmd_head`.
    pub fn fetch(&mut self, mem: &SharedMap) -> Result<Vec<Fetched>, RingError> {
        let head = mem.load_acquire_u32(off::MB_CMD_HEAD)?;
        if head >= self.cmdr_size || head % 8 != 0 {
            return Err(RingError::Mailbox(format!("cmd_head {head} invalid")));
        }
        let mut out = Vec::new();
        while self.fetch_tail != head {
            let at = self.fetch_tail;
            let e = self.abs(at);
            let len_op = mem.read_u32(e + off::HDR_LEN_OP)?;
            let len = len_op & !(sys::TCMU_OP_MASK);
            let op = len_op & sys::TCMU_OP_MASK;
            let dist = (head + self.cmdr_size - at) % self.cmdr_size;
            if len < 8 || len > dist || at as u64 + len as u64 > self.cmdr_size as u64 {
                return Err(entry_err(at, EntryFault::Length { len, head }));
            }
            let mut slot = Slot {
                off: at,
                len,
                cmd: None,
                done: None,
            };
            if op == sys::tcmu_opcode_TCMU_OP_CMD {
                let cmd_id = mem.read_u16(e + off::HDR_CMD_ID)?;
                if self
                    .slots
                    .iter()
                    .any(|s| s.cmd == Some(cmd_id) && s.done.is_none())
                {
                    // Completing either copy would free the id under the other one.
                    return Err(entry_err(at, EntryFault::DuplicateId(cmd_id)));
                }
                slot.cmd = Some(cmd_id);
                out.push(match self.parse_cmd(mem, at, len, cmd_id)? {
                    Ok(cmd) => Fetched::Cmd(cmd),
                    Err(fault) => Fetched::Malformed(Malformed {
                        offset: at,
                        cmd_id: Some(cmd_id),
                        fault,
                    }),
                });
            } else if op == sys::tcmu_opcode_TCMU_OP_TMR {
                out.push(match Self::parse_tmr(mem, e, len)? {
                    Ok(t) => Fetched::Tmr(t),
                    Err(fault) => Fetched::Malformed(Malformed {
                        offset: at,
                        cmd_id: None,
                        fault,
                    }),
                });
            } else if op != sys::tcmu_opcode_TCMU_OP_PAD {
                // An opcode this build does not know: tell the kernel, skip it.
                let uf = mem.read_u8(e + off::HDR_UFLAGS)?;
                mem.write_u8(e + off::HDR_UFLAGS, uf | sys::TCMU_UFLAG_UNKNOWN_OP as u8)?;
            }
            self.slots.push_back(slot);
            self.fetch_tail = (at + len) % self.cmdr_size;
        }
        // Entries that need no completion at the front can be passed at once.
        self.pass_prefix(mem)?;
        Ok(out)
    }

    fn parse_tmr(mem: &SharedMap, e: u64, len: u32) -> Result<Result<Tmr, EntryFault>, ShmError> {
        if (len as u64) < off::TMR_CMD_IDS {
            return Ok(Err(EntryFault::TmrTooShort));
        }
        let tmr_type = mem.read_u8(e + off::TMR_TYPE)?;
        let ids = mem.read_u32(e + off::TMR_CMD_CNT)? as u64;
        if off::TMR_CMD_IDS + 2 * ids > len as u64 {
            return Ok(Err(EntryFault::TmrIds { ids, len }));
        }
        let cmd_ids = (0..ids)
            .map(|i| mem.read_u16(e + off::TMR_CMD_IDS + 2 * i))
            .collect::<Result<_, _>>()?;
        Ok(Ok(Tmr { tmr_type, cmd_ids }))
    }

    /// Parses a CMD entry whose length is sound. Everything sized by the entry's
    /// contents is checked before anything is allocated from it: the iovec count
    /// against the entry length, every iovec against the data area, and the iovecs
    /// against each other (disjoint, so their total is at most the data area).
    fn parse_cmd(
        &self,
        mem: &SharedMap,
        at: u32,
        len: u32,
        cmd_id: u16,
    ) -> Result<Result<Command, EntryFault>, ShmError> {
        let e = self.abs(at);
        let iov_cnt = mem.read_u32(e + off::REQ_IOV_CNT)?;
        let bidi_cnt = mem.read_u32(e + off::REQ_IOV_BIDI_CNT)?;
        let (n, nb) = (iov_cnt as u64, bidi_cnt as u64);
        let iov_end = off::REQ_IOV + off::IOV_SIZE * (n + nb);
        if iov_end > len as u64 {
            return Ok(Err(EntryFault::TooManyIovecs {
                iov_cnt,
                bidi_cnt,
                len,
            }));
        }
        let cdb_off = mem.read_u64(e + off::REQ_CDB_OFF)?;
        let entry_end = e + len as u64;
        if cdb_off < e + iov_end || cdb_off >= entry_end {
            return Ok(Err(EntryFault::CdbOutside(cdb_off)));
        }
        let avail = (entry_end - cdb_off) as usize;
        let mut head = [0u8; 8];
        let hn = avail.min(8);
        mem.read(cdb_off, &mut head[..hn])?;
        let Some(cl) = cdb_len(&head[..hn]) else {
            return Ok(Err(EntryFault::CdbTruncated));
        };
        if cl > avail || cl > MAX_CDB {
            return Ok(Err(EntryFault::CdbTooLong { len: cl, avail }));
        }
        // n + nb <= len / 16 here: the vectors are bounded by the ring, not by data.
        let mut all = Vec::with_capacity((n + nb) as usize);
        for i in 0..n + nb {
            match self.iovec(mem, e + off::REQ_IOV + off::IOV_SIZE * i)? {
                Ok(v) => all.push(v),
                Err(f) => return Ok(Err(f)),
            }
        }
        if let Some(f) = overlap(&all) {
            return Ok(Err(f));
        }
        let mut cdb = vec![0u8; cl];
        mem.read(cdb_off, &mut cdb)?;
        let bidi_iovs = all.split_off(n as usize);
        Ok(Ok(Command {
            cmd_id,
            cdb,
            iovs: all,
            bidi_iovs,
        }))
    }

    fn write_response(
        &self,
        mem: &SharedMap,
        slot_off: u32,
        cmd_id: u16,
        r: &Response,
    ) -> Result<(), RingError> {
        let e = self.abs(slot_off);
        mem.write_u16(e + off::HDR_CMD_ID, cmd_id)?;
        let mut uflags = 0u8;
        let mut read_len = 0u32;
        if let Some(n) = r.read_len {
            if self.flags as u32 & sys::TCMU_MAILBOX_FLAG_CAP_READ_LEN != 0 {
                uflags |= sys::TCMU_UFLAG_READ_LEN as u8;
                read_len = n;
            }
        }
        mem.write_u8(e + off::HDR_UFLAGS, uflags)?;
        mem.write_u8(e + off::RSP_STATUS, r.status)?;
        mem.write_u32(e + off::RSP_READ_LEN, read_len)?;
        let mut sense = [0u8; SENSE_SIZE];
        let n = r.sense.len().min(SENSE_SIZE);
        sense[..n].copy_from_slice(&r.sense[..n]);
        mem.write(e + off::RSP_SENSE, &sense)?;
        Ok(())
    }

    /// Advances the tail over leading entries that need nothing more.
    fn pass_prefix(&mut self, mem: &SharedMap) -> Result<(), RingError> {
        while let Some(front) = self.slots.front() {
            match (&front.cmd, &front.done) {
                (None, _) => {}
                (Some(id), Some(r)) => self.write_response(mem, front.off, *id, r)?,
                (Some(_), None) => break,
            }
            let s = self.slots.pop_front().expect("front");
            self.tail = (s.off + s.len) % self.cmdr_size;
            self.moved = true;
        }
        Ok(())
    }

    /// Records the completion of `cmd_id`. Call [`Queue::publish`] afterwards.
    pub fn complete(&mut self, mem: &SharedMap, cmd_id: u16, r: Response) -> Result<(), RingError> {
        if !self
            .slots
            .iter()
            .any(|s| s.cmd == Some(cmd_id) && s.done.is_none())
        {
            return Err(RingError::UnknownId(cmd_id));
        }
        if self.out_of_order() {
            // Steal the first CMD slot at the tail for this completion (§1.10): the
            // kernel identifies the command by the id written into the slot.
            self.pass_prefix(mem)?;
            let pos = self
                .slots
                .iter()
                .position(|s| s.cmd.is_some())
                .expect("a CMD slot");
            let front_id = self.slots[pos].cmd.expect("cmd");
            if front_id != cmd_id {
                // The finishing command's own slot now stands for the one whose slot
                // we take: swap their ids so the bookkeeping stays one slot per id.
                let own = self
                    .slots
                    .iter()
                    .position(|s| s.cmd == Some(cmd_id) && s.done.is_none())
                    .expect("outstanding");
                self.slots[own].cmd = Some(front_id);
            }
            self.slots[pos].cmd = Some(cmd_id);
            self.slots[pos].done = Some(r);
        } else {
            let s = self
                .slots
                .iter_mut()
                .find(|s| s.cmd == Some(cmd_id) && s.done.is_none())
                .expect("outstanding");
            s.done = Some(r);
        }
        self.pass_prefix(mem)
    }

    /// Starts over after the kernel reset the ring ([`Doorbell::reset_ring`]): every
    /// fetched entry is forgotten (the kernel completed them all) and fetching resumes
    /// at the mailbox's `cmd_tail` (0 after a reset).
    pub fn restart(&mut self, mem: &SharedMap) -> Result<(), RingError> {
        let tail = mem.load_acquire_u32(off::MB_CMD_TAIL)?;
        if tail >= self.cmdr_size || tail % 8 != 0 {
            return Err(RingError::Mailbox(format!("cmd_tail {tail} invalid")));
        }
        self.fetch_tail = tail;
        self.tail = tail;
        self.slots.clear();
        self.moved = false;
        Ok(())
    }

    /// Publishes the tail (release store) if it moved; returns whether a kick is due.
    pub fn publish(&mut self, mem: &SharedMap) -> Result<bool, RingError> {
        if !self.moved {
            return Ok(false);
        }
        mem.store_release_u32(off::MB_CMD_TAIL, self.tail)?;
        self.moved = false;
        Ok(true)
    }
}

impl Ring {
    /// Validates the mailbox of `map` and takes over the ring at the current `cmd_tail`;
    /// from then on the data area of `map` is reached only through loans
    /// ([`Ring::lend`]).
    pub fn new(mut map: SharedMap) -> Result<Ring, RingError> {
        let q = Queue::new(&map)?;
        map.set_lendable(q.data_off())?;
        Ok(Ring {
            mem: Arc::new(map),
            q,
        })
    }

    /// The state machine, for what [`Ring`] does not pass on.
    pub fn queue(&self) -> &Queue {
        &self.q
    }

    /// "head H tail T size S flags F", for logs.
    pub fn describe(&self) -> String {
        self.q.describe(&self.mem)
    }

    /// Mailbox capability flags.
    pub fn flags(&self) -> u16 {
        self.q.flags()
    }

    /// True when the kernel accepts out-of-order completions.
    pub fn out_of_order(&self) -> bool {
        self.q.out_of_order()
    }

    /// Commands fetched and not yet completed.
    pub fn outstanding(&self) -> usize {
        self.q.outstanding()
    }

    /// Whether the kernel queued entries not fetched yet (one shared-memory load).
    pub fn pending(&self) -> bool {
        self.q.pending(&self.mem)
    }

    /// Fetches every entry between our tail and `cmd_head` ([`Queue::fetch`]).
    pub fn fetch(&mut self) -> Result<Vec<Fetched>, RingError> {
        self.q.fetch(&self.mem)
    }

    /// Lends a command's iovecs as slices of the data area, from fetching the command
    /// until its completion: the loan must be dropped before [`Ring::complete`], after
    /// which the kernel reuses the blocks. Fails ([`ShmError::InUse`]) for iovecs that
    /// share bytes with those of a command still lent (a kernel that does that is
    /// broken: the command is refused, not served).
    pub fn lend(&self, iovs: &[IoVec]) -> Result<Lent, RingError> {
        let ranges: Vec<(u64, u64)> = iovs.iter().map(|v| (v.off, v.len)).collect();
        Ok(self.mem.lend(&ranges)?)
    }

    /// Copies a command's Data-Out bytes out of the ring (a contiguous copy, for
    /// parameter lists; the data of a write is lent instead).
    pub fn gather(&self, iovs: &[IoVec]) -> Result<Vec<u8>, RingError> {
        Ok(self.lend(iovs)?.gather()?)
    }

    /// Copies Data-In bytes into a command's iovecs (at most their total length);
    /// the rest of the iovecs is zeroed so no stale data reaches the initiator.
    pub fn scatter(&self, iovs: &[IoVec], data: &[u8]) -> Result<(), RingError> {
        Ok(self.lend(iovs)?.scatter(data)?)
    }

    /// Records the completion of `cmd_id` ([`Queue::complete`]). Call [`Ring::publish`]
    /// afterwards.
    pub fn complete(&mut self, cmd_id: u16, r: Response) -> Result<(), RingError> {
        self.q.complete(&self.mem, cmd_id, r)
    }

    /// Starts over after the kernel reset the ring ([`Queue::restart`]).
    pub fn restart(&mut self) -> Result<(), RingError> {
        self.q.restart(&self.mem)
    }

    /// True once the mapping faulted (SIGBUS) and was replaced by zero pages.
    pub fn is_gone(&self) -> bool {
        self.mem.is_gone()
    }

    /// Publishes the tail (release store) if it moved; returns whether a kick is due.
    pub fn publish(&mut self) -> Result<bool, RingError> {
        self.q.publish(&self.mem)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cdb_lengths_follow_the_group_code() {
        assert_eq!(cdb_len(&[0x00]), Some(6));
        assert_eq!(cdb_len(&[0x28]), Some(10));
        assert_eq!(cdb_len(&[0x55]), Some(10));
        assert_eq!(cdb_len(&[0xa8]), Some(12));
        assert_eq!(cdb_len(&[0x88]), Some(16));
        assert_eq!(cdb_len(&[0x7f, 0, 0, 0, 0, 0, 0, 24]), Some(32));
        assert_eq!(cdb_len(&[0x7f, 0]), None);
        assert_eq!(cdb_len(&[]), None);
    }
}
