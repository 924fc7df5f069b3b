//! A kernel-side TCMU ring emulator: lays out a mapping exactly as
//! `target_core_user` does (mailbox, command ring, data area), queues
//! commands as the kernel's `queue_cmd_ring` would (PAD at the wrap, 1 byte kept free,
//! data blocks, iovecs as map offsets, ids 1..65535), signals the handler through an
//! eventfd, and reaps completions like `tcmu_handle_completions` (walking from its last
//! cleaned offset to `cmd_tail`, finding each command by the id in the slot). The
//! handler's doorbell can reset the ring as `action/reset_ring` does (outstanding
//! commands completed BUSY, head = tail = 0), and the backing memory can be truncated
//! away (the SIGBUS a removed device gives).
//!
//! The memory is a heap buffer ([`SharedMap::heap`]) unless a test needs a real mapping
//! ([`Emulator::new_mapped`]: a memfd, which can be truncated); the handler's side
//! gets another handle on the same memory ([`Emulator::handler_map`]). Only built with
//! the `test-utils` feature: the tests, the ring benchmark and the fuzzers use it.

use std::collections::HashMap;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::sync::{Arc, Mutex};

use crate::ring::{cdb_len, off, Doorbell, CMD_ENTRY_SIZE, MAILBOX_SIZE, SENSE_SIZE};
use crate::shm::{memfd, SharedMap};
use crate::sys;

/// Where the emulator puts the command ring: right after the mailbox, as the kernel does.
pub const CMDR_OFF: u64 = MAILBOX_SIZE;
/// The data area's block size (the kernel's `DATA_BLOCK_SIZE`, a page).
pub const BLOCK: u64 = 4096;
/// Mailbox flag: out-of-order completions.
pub const FLAG_OOOC: u16 = sys::TCMU_MAILBOX_FLAG_CAP_OOOC as u16;
/// Mailbox flag: `read_len` in responses.
pub const FLAG_READ_LEN: u16 = sys::TCMU_MAILBOX_FLAG_CAP_READ_LEN as u16;
/// Mailbox flag: TMR notifications.
pub const FLAG_TMR: u16 = sys::TCMU_MAILBOX_FLAG_CAP_TMR as u16;

struct Inflight {
    blocks: Vec<usize>,
    iovs: Vec<(u64, u64)>,
    data_in_len: usize,
}

/// What the initiator gets back for a command.
#[derive(Debug, Clone)]
pub struct Completion {
    /// The command's id.
    pub cmd_id: u16,
    /// SAM status.
    pub status: u8,
    /// The response's sense buffer (all of it).
    pub sense: Vec<u8>,
    /// Data-In, cut to `read_len` when the handler reported one.
    pub data_in: Vec<u8>,
}

/// SAM status BUSY, what `reset_ring` 1 completes outstanding commands with.
pub const BUSY: u8 = 0x08;

/// The ring state the kernel keeps under its `cmdr_lock`.
struct Kernel {
    head: u32,
    last_cleaned: u32,
    blocks: Vec<bool>,
    inflight: HashMap<u16, Inflight>,
    next_id: u16,
    /// Completions the initiators got from a ring reset, returned by the next reap.
    reset_completions: Vec<Completion>,
    resets: u64,
    /// Whether `action/reset_ring` exists.
    can_reset: bool,
    /// Data blocks handed out every other free one (a fragmented data area: one iovec
    /// per block).
    fragmented: bool,
}

/// The kernel's side of one TCMU device.
pub struct Emulator {
    /// The memfd behind a mapped device ([`Emulator::new_mapped`]).
    fd: Option<OwnedFd>,
    /// The kernel's handle on the device memory.
    pub map: Arc<SharedMap>,
    /// Size of the device memory.
    pub map_len: usize,
    /// Size of the command ring.
    pub cmdr_size: u32,
    /// Where the data area starts.
    pub data_off: u64,
    k: Arc<Mutex<Kernel>>,
    to_handler: OwnedFd,
    to_kernel: OwnedFd,
}

/// The handler's doorbell on an emulated device.
pub struct EmuDoorbell {
    to_handler: OwnedFd,
    to_kernel: OwnedFd,
    k: Arc<Mutex<Kernel>>,
    map: Arc<SharedMap>,
}

impl Doorbell for EmuDoorbell {
    fn fd(&self) -> RawFd {
        self.to_handler.as_raw_fd()
    }
    fn ack(&self) -> std::io::Result<()> {
        let mut b = [0u8; 8];
        match rustix::io::read(&self.to_handler, &mut b) {
            Ok(_) => Ok(()),
            Err(e) if e == rustix::io::Errno::AGAIN => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
    fn kick(&self) -> std::io::Result<()> {
        rustix::io::write(&self.to_kernel, &1u64.to_ne_bytes())?;
        Ok(())
    }
    /// `tcmu_reset_ring(udev, 1)`: every outstanding command completes BUSY, its data
    /// blocks are freed, `cmd_head` = `cmd_tail` = 0.
    fn reset_ring(&self) -> std::io::Result<bool> {
        let mut k = self.k.lock().unwrap();
        if !k.can_reset {
            return Ok(false);
        }
        let ids: Vec<u16> = k.inflight.keys().copied().collect();
        for id in ids {
            let inf = k.inflight.remove(&id).unwrap();
            for b in inf.blocks {
                k.blocks[b] = false;
            }
            k.reset_completions.push(Completion {
                cmd_id: id,
                status: BUSY,
                sense: vec![0u8; SENSE_SIZE],
                data_in: Vec::new(),
            });
        }
        k.head = 0;
        k.last_cleaned = 0;
        k.resets += 1;
        self.map.store_release_u32(off::MB_CMD_HEAD, 0).unwrap();
        self.map.store_release_u32(off::MB_CMD_TAIL, 0).unwrap();
        Ok(true)
    }
}

fn eventfd() -> OwnedFd {
    rustix::event::eventfd(
        0,
        rustix::event::EventfdFlags::NONBLOCK | rustix::event::EventfdFlags::CLOEXEC,
    )
    .unwrap()
}

impl Emulator {
    /// A device with a `cmdr_size`-byte ring and `data_size` bytes of data area, in
    /// heap memory.
    pub fn new(cmdr_size: u32, data_size: u64, flags: u16) -> Emulator {
        let map_len = Self::layout(cmdr_size, data_size);
        Self::over(SharedMap::heap(map_len).unwrap(), None, cmdr_size, flags)
    }

    /// As [`Emulator::new`], in a shared mapping of a memfd (so that
    /// [`Emulator::truncate_backing`] can take it away).
    pub fn new_mapped(cmdr_size: u32, data_size: u64, flags: u16) -> Emulator {
        let map_len = Self::layout(cmdr_size, data_size);
        let fd = memfd("tcmu-emulator", map_len as u64).unwrap();
        let map = SharedMap::map(fd.as_fd(), map_len).unwrap();
        Self::over(map, Some(fd), cmdr_size, flags)
    }

    fn layout(cmdr_size: u32, data_size: u64) -> usize {
        let data_off = CMDR_OFF + cmdr_size as u64;
        assert_eq!(data_off % BLOCK, 0, "data area must be page aligned");
        (data_off + data_size) as usize
    }

    fn over(map: SharedMap, fd: Option<OwnedFd>, cmdr_size: u32, flags: u16) -> Emulator {
        let map_len = map.len();
        let data_off = CMDR_OFF + cmdr_size as u64;
        let data_size = map_len as u64 - data_off;
        map.write_u16(off::MB_VERSION, sys::TCMU_MAILBOX_VERSION as u16)
            .unwrap();
        map.write_u16(off::MB_FLAGS, flags).unwrap();
        map.write_u32(off::MB_CMDR_OFF, CMDR_OFF as u32).unwrap();
        map.write_u32(off::MB_CMDR_SIZE, cmdr_size).unwrap();
        let map = Arc::new(map);
        Emulator {
            fd,
            map,
            map_len,
            cmdr_size,
            data_off,
            k: Arc::new(Mutex::new(Kernel {
                head: 0,
                last_cleaned: 0,
                blocks: vec![false; (data_size / BLOCK) as usize],
                inflight: HashMap::new(),
                next_id: 1,
                reset_completions: Vec::new(),
                resets: 0,
                can_reset: true,
                fragmented: false,
            })),
            to_handler: eventfd(),
            to_kernel: eventfd(),
        }
    }

    /// The default geometry of a real device scaled down: 64 KiB ring, 4 MiB data.
    pub fn small(flags: u16) -> Emulator {
        Emulator::new((64 << 10) - CMDR_OFF as u32, 4 << 20, flags)
    }

    /// The handler's handle on the same memory, as its mmap of /dev/uioN.
    pub fn handler_map(&self) -> SharedMap {
        self.map.alias()
    }

    /// The handler's doorbell.
    pub fn doorbell(&self) -> EmuDoorbell {
        EmuDoorbell {
            to_handler: self.to_handler.try_clone().unwrap(),
            to_kernel: self.to_kernel.try_clone().unwrap(),
            k: self.k.clone(),
            map: self.map.clone(),
        }
    }

    /// How many times the handler had the ring reset.
    pub fn resets(&self) -> u64 {
        self.k.lock().unwrap().resets
    }

    /// Hands out data blocks from here on skipping one free block after each, so a
    /// command's data is one iovec per block, as in a fragmented data area.
    pub fn set_fragmented(&self, on: bool) {
        self.k.lock().unwrap().fragmented = on;
    }

    /// The iovecs (map offset, length) of command `id`, while it is queued.
    pub fn iovs_of(&self, id: u16) -> Vec<(u64, u64)> {
        self.k
            .lock()
            .unwrap()
            .inflight
            .get(&id)
            .map(|i| i.iovs.clone())
            .unwrap_or_default()
    }

    /// Makes `action/reset_ring` absent (an old kernel).
    pub fn set_can_reset(&self, on: bool) {
        self.k.lock().unwrap().can_reset = on;
    }

    /// Shrinks the memory behind the mapping to nothing, as a removed device leaves
    /// it: every later access to either side's mapping raises SIGBUS. Only for a
    /// device made by [`Emulator::new_mapped`].
    pub fn truncate_backing(&self) {
        let fd = self.fd.as_ref().expect("a mapped emulator (new_mapped)");
        std::fs::File::from(fd.try_clone().unwrap())
            .set_len(0)
            .unwrap();
    }

    /// Raises the handler's event without queueing anything.
    pub fn ring_doorbell(&self) {
        self.kick_handler();
    }

    /// The fd the emulator watches for the handler's kicks.
    pub fn kernel_fd(&self) -> &OwnedFd {
        &self.to_kernel
    }

    fn used(&self, k: &Kernel) -> u32 {
        (k.head + self.cmdr_size - k.last_cleaned) % self.cmdr_size
    }

    fn alloc_blocks(k: &mut Kernel, bytes: usize) -> Option<Vec<usize>> {
        let need = bytes.div_ceil(BLOCK as usize);
        let step = if k.fragmented { 2 } else { 1 };
        let free: Vec<usize> = k
            .blocks
            .iter()
            .enumerate()
            .filter(|(_, u)| !**u)
            .map(|(i, _)| i)
            .step_by(step)
            .take(need)
            .collect();
        if free.len() < need {
            return None;
        }
        for &b in &free {
            k.blocks[b] = true;
        }
        Some(free)
    }

    fn iovs_for(&self, blocks: &[usize], bytes: usize) -> Vec<(u64, u64)> {
        let mut iovs: Vec<(u64, u64)> = Vec::new();
        let mut left = bytes as u64;
        for &b in blocks {
            let n = left.min(BLOCK);
            let off = self.data_off + b as u64 * BLOCK;
            match iovs.last_mut() {
                Some(last) if last.0 + last.1 == off => last.1 += n,
                _ => iovs.push((off, n)),
            }
            left -= n;
        }
        iovs
    }

    fn kick_handler(&self) {
        rustix::io::write(&self.to_handler, &1u64.to_ne_bytes()).unwrap();
    }

    /// Reserves `len` bytes of ring at the head (writing a PAD if it would wrap);
    /// returns the entry's ring offset, or None if the ring is full.
    fn reserve(&self, k: &mut Kernel, len: u32) -> Option<u32> {
        let to_end = self.cmdr_size - k.head;
        let pad = if to_end < len { to_end } else { 0 };
        if self.cmdr_size - self.used(k) - 1 < pad + len {
            return None;
        }
        if pad > 0 {
            let e = CMDR_OFF + k.head as u64;
            self.map.fill(e, 8, 0).unwrap();
            let len_op = pad | sys::tcmu_opcode_TCMU_OP_PAD;
            self.map.write_u32(e + off::HDR_LEN_OP, len_op).unwrap();
            k.head = 0;
        }
        Some(k.head)
    }

    fn publish_head(&self, k: &mut Kernel, at: u32, len: u32) {
        k.head = (at + len) % self.cmdr_size;
        self.map
            .store_release_u32(off::MB_CMD_HEAD, k.head)
            .unwrap();
        self.kick_handler();
    }

    /// Queues a command: Data-Out bytes copied into data blocks, or room for
    /// `data_in_len` bytes of Data-In. Returns its id, or None when the ring or the
    /// data area is full (the kernel would queue it internally).
    pub fn submit(&mut self, cdb: &[u8], data_out: &[u8], data_in_len: usize) -> Option<u16> {
        let k = self.k.clone();
        let mut k = k.lock().unwrap();
        let bytes = data_out.len().max(data_in_len);
        let blocks = Self::alloc_blocks(&mut k, bytes)?;
        let iovs = self.iovs_for(&blocks, bytes);
        // The CDB follows the iovecs, and never starts inside the fixed-size entry.
        let base =
            ((off::REQ_IOV + off::IOV_SIZE * iovs.len() as u64) as u32).max(CMD_ENTRY_SIZE as u32);
        let len = base + (cdb.len() as u32).div_ceil(8) * 8;
        let Some(at) = self.reserve(&mut k, len) else {
            for &b in &blocks {
                k.blocks[b] = false;
            }
            return None;
        };
        let id = k.next_id;
        k.next_id = if k.next_id == u16::MAX {
            1
        } else {
            k.next_id + 1
        };
        let e = CMDR_OFF + at as u64;
        self.map.fill(e, len as u64, 0).unwrap();
        let len_op = len | sys::tcmu_opcode_TCMU_OP_CMD;
        self.map.write_u32(e + off::HDR_LEN_OP, len_op).unwrap();
        self.map.write_u16(e + off::HDR_CMD_ID, id).unwrap();
        let m = &self.map;
        m.write_u32(e + off::REQ_IOV_CNT, iovs.len() as u32)
            .unwrap();
        m.write_u64(e + off::REQ_CDB_OFF, e + base as u64).unwrap();
        for (i, (o, l)) in iovs.iter().enumerate() {
            let v = e + off::REQ_IOV + off::IOV_SIZE * i as u64;
            m.write_u64(v + off::IOV_BASE, *o).unwrap();
            m.write_u64(v + off::IOV_LEN, *l).unwrap();
        }
        self.map.write(e + base as u64, cdb).unwrap();
        let mut pos = 0;
        for (o, l) in &iovs {
            let n = (*l as usize).min(data_out.len().saturating_sub(pos));
            self.map.write(*o, &data_out[pos..pos + n]).unwrap();
            pos += n;
        }
        k.inflight.insert(
            id,
            Inflight {
                blocks,
                iovs,
                data_in_len,
            },
        );
        self.publish_head(&mut k, at, len);
        Some(id)
    }

    /// Writes raw entry bytes (for malformed-entry tests) and publishes them.
    pub fn submit_raw(&mut self, entry: &[u8]) {
        let k = self.k.clone();
        let mut k = k.lock().unwrap();
        let len = entry.len() as u32;
        let at = self.reserve(&mut k, len).expect("ring space");
        self.map.write(CMDR_OFF + at as u64, entry).unwrap();
        self.publish_head(&mut k, at, len);
    }

    /// Writes a raw CMD entry the kernel knows as a command (a fresh id is written
    /// into it and expected back on completion); returns the id.
    pub fn submit_raw_cmd(&mut self, entry: &[u8]) -> u16 {
        let id = {
            let mut k = self.k.lock().unwrap();
            let id = k.next_id;
            k.next_id = if id == u16::MAX { 1 } else { id + 1 };
            k.inflight.insert(
                id,
                Inflight {
                    blocks: Vec::new(),
                    iovs: Vec::new(),
                    data_in_len: 0,
                },
            );
            id
        };
        let mut e = entry.to_vec();
        let at = off::HDR_CMD_ID as usize;
        e[at..at + 2].copy_from_slice(&id.to_ne_bytes());
        self.submit_raw(&e);
        id
    }

    /// Queues a TMR notification listing `ids`; false when the ring is full.
    pub fn submit_tmr(&mut self, tmr_type: u8, ids: &[u16]) -> bool {
        let k = self.k.clone();
        let mut k = k.lock().unwrap();
        let len = (off::TMR_CMD_IDS as u32 + 2 * ids.len() as u32).div_ceil(8) * 8;
        let Some(at) = self.reserve(&mut k, len) else {
            return false;
        };
        let e = CMDR_OFF + at as u64;
        self.map.fill(e, len as u64, 0).unwrap();
        let len_op = len | sys::tcmu_opcode_TCMU_OP_TMR;
        self.map.write_u32(e + off::HDR_LEN_OP, len_op).unwrap();
        self.map.write_u8(e + off::TMR_TYPE, tmr_type).unwrap();
        self.map
            .write_u32(e + off::TMR_CMD_CNT, ids.len() as u32)
            .unwrap();
        for (i, id) in ids.iter().enumerate() {
            let at = e + off::TMR_CMD_IDS + 2 * i as u64;
            self.map.write_u16(at, *id).unwrap();
        }
        self.publish_head(&mut k, at, len);
        true
    }

    /// Writes `bytes` over the command ring from its start (at most the ring) and
    /// publishes `head`, as a kernel gone wrong would: for the fuzzers. Nothing written
    /// this way is known to the emulator as a command.
    pub fn scribble(&mut self, bytes: &[u8], head: u32) {
        let n = bytes.len().min(self.cmdr_size as usize);
        self.map.write(CMDR_OFF, &bytes[..n]).unwrap();
        self.map.store_release_u32(off::MB_CMD_HEAD, head).unwrap();
    }

    /// Commands queued and not reaped.
    pub fn inflight(&self) -> usize {
        self.k.lock().unwrap().inflight.len()
    }

    /// Processes completions up to the handler's `cmd_tail` (what the kernel does on
    /// a kick). Panics on an unknown id, which would mark a real ring broken.
    pub fn reap(&mut self) -> Vec<Completion> {
        let mut b = [0u8; 8];
        let _ = rustix::io::read(&self.to_kernel, &mut b);
        let k = self.k.clone();
        let mut k = k.lock().unwrap();
        let tail = self.map.load_acquire_u32(off::MB_CMD_TAIL).unwrap();
        let mut out = std::mem::take(&mut k.reset_completions);
        while k.last_cleaned != tail {
            let e = CMDR_OFF + k.last_cleaned as u64;
            let len_op = self.map.read_u32(e + off::HDR_LEN_OP).unwrap();
            let len = len_op & !sys::TCMU_OP_MASK;
            assert!(len >= 8, "zero-length entry at {}", k.last_cleaned);
            if len_op & sys::TCMU_OP_MASK == sys::tcmu_opcode_TCMU_OP_CMD {
                let id = self.map.read_u16(e + off::HDR_CMD_ID).unwrap();
                let inf = k
                    .inflight
                    .remove(&id)
                    .unwrap_or_else(|| panic!("cmd_id {id} not found, ring is broken"));
                let status = self.map.read_u8(e + off::RSP_STATUS).unwrap();
                let uflags = self.map.read_u8(e + off::HDR_UFLAGS).unwrap();
                let mut sense = vec![0u8; SENSE_SIZE];
                self.map.read(e + off::RSP_SENSE, &mut sense).unwrap();
                let mut n = inf.data_in_len;
                if uflags & sys::TCMU_UFLAG_READ_LEN as u8 != 0 {
                    let rl = self.map.read_u32(e + off::RSP_READ_LEN).unwrap() as usize;
                    if rl != 0 {
                        n = n.min(rl);
                    }
                }
                let mut data_in = vec![0u8; inf.data_in_len];
                let mut pos = 0;
                for (o, l) in &inf.iovs {
                    let k = (*l as usize).min(inf.data_in_len.saturating_sub(pos));
                    self.map.read(*o, &mut data_in[pos..pos + k]).unwrap();
                    pos += k;
                }
                data_in.truncate(n);
                for b in inf.blocks {
                    k.blocks[b] = false;
                }
                out.push(Completion {
                    cmd_id: id,
                    status,
                    sense,
                    data_in,
                });
            }
            k.last_cleaned = (k.last_cleaned + len) % self.cmdr_size;
        }
        out
    }

    /// Length of the CDB at the start of `cdb` (for tests building raw entries).
    pub fn cdb_len(cdb: &[u8]) -> usize {
        cdb_len(cdb).unwrap()
    }
}
