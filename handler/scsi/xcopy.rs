//! EXTENDED COPY (LID1) and RECEIVE COPY RESULTS (OPERATING PARAMETERS), SPC-4 6.3 and
//! 6.18: block-to-block copies (segment descriptor 02h) between copy targets named by
//! identification CSCD descriptors (E4h) carrying a LUN's NAA designator. A target is
//! the LUN that received the command or any other LUN of this process that joined
//! the copy domain ([`register`]); the copy runs on the worker that received the
//! command, holding every involved LUN's I/O lock shared (taken in address order, so
//! two copies in opposite directions cannot deadlock).

use std::sync::{Arc, Mutex, PoisonError, RwLockReadGuard, Weak};

use super::sense::{self, key, Sense};
use super::{naa, read_error, BlockBackend, Blocks, Lba, LunConfig, LunState, ScsiResponse};

/// Most CSCD descriptors in one EXTENDED COPY.
pub const MAX_CSCD_DESCRIPTORS: u16 = 8;
/// Most segment descriptors in one EXTENDED COPY.
pub const MAX_SEGMENT_DESCRIPTORS: u16 = 64;
/// Largest parameter list (header + descriptors).
pub const MAX_LIST_LEN: u32 =
    16 + 32 * MAX_CSCD_DESCRIPTORS as u32 + 28 * MAX_SEGMENT_DESCRIPTORS as u32;
/// Bytes copied per step.
const CHUNK: u64 = 1 << 20;

const CSCD_IDENTIFICATION: u8 = 0xe4;
const SEGMENT_BLOCK_TO_BLOCK: u8 = 0x02;

/// ILLEGAL REQUEST / TOO MANY TARGET DESCRIPTORS (SPC-4 table D.1).
const TOO_MANY_CSCD: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x26, 0x06);
/// ILLEGAL REQUEST / UNSUPPORTED TARGET DESCRIPTOR TYPE CODE.
const UNSUPPORTED_CSCD_TYPE: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x26, 0x07);
/// ILLEGAL REQUEST / TOO MANY SEGMENT DESCRIPTORS.
const TOO_MANY_SEGMENTS: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x26, 0x08);
/// ILLEGAL REQUEST / UNSUPPORTED SEGMENT DESCRIPTOR TYPE CODE.
const UNSUPPORTED_SEGMENT_TYPE: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x26, 0x09);
/// COPY ABORTED / COPY TARGET DEVICE NOT REACHABLE.
const TARGET_NOT_REACHABLE: Sense = Sense::new(key::COPY_ABORTED, 0x0d, 0x02);

struct Member {
    naa: [u8; 16],
    lun: Weak<LunState>,
    be: Weak<dyn BlockBackend>,
}

/// Every LUN of this process that EXTENDED COPY may name (the daemon's LUNs).
static DOMAIN: Mutex<Vec<Member>> = Mutex::new(Vec::new());

/// Makes `lun` (served on `be`) a copy target of the EXTENDED COPY commands any LUN
/// of this process receives, for as long as both live.
pub fn register(lun: &Arc<LunState>, be: &Arc<dyn BlockBackend>) {
    let mut d = DOMAIN.lock().unwrap_or_else(PoisonError::into_inner);
    d.retain(|m| m.lun.strong_count() > 0 && m.be.strong_count() > 0);
    d.push(Member {
        naa: naa(&lun.cfg),
        lun: Arc::downgrade(lun),
        be: Arc::downgrade(be),
    });
}

fn find(naa: &[u8]) -> Option<(Arc<LunState>, Arc<dyn BlockBackend>)> {
    let d = DOMAIN.lock().unwrap_or_else(PoisonError::into_inner);
    d.iter()
        .rev()
        .filter(|m| m.naa[..] == *naa)
        .find_map(|m| Some((m.lun.upgrade()?, m.be.upgrade()?)))
}

/// A copy target: the LUN that received the command, or another one.
enum Target {
    Own,
    Other(Arc<LunState>, Arc<dyn BlockBackend>),
}

struct Segment {
    src: usize,
    dst: usize,
    blocks: Blocks,
    src_lba: Lba,
    dst_lba: Lba,
}

fn be_u(b: &[u8]) -> u64 {
    b.iter().fold(0u64, |a, &x| (a << 8) | x as u64)
}

fn param(s: Sense) -> ScsiResponse {
    ScsiResponse::error(s)
}

/// EXTENDED COPY (LID1) with a parameter list of `len` bytes in `data`.
pub(super) fn extended_copy(
    lun: &LunState,
    be: &dyn BlockBackend,
    len: usize,
    data: &[u8],
) -> ScsiResponse {
    if len == 0 {
        return ScsiResponse::good(Vec::new()); // no copy: not an error
    }
    if data.len() != len {
        return param(sense::INVALID_FIELD_IN_IU);
    }
    if len < 16 || len as u64 > MAX_LIST_LEN as u64 {
        return param(sense::PARAMETER_LIST_LENGTH_ERROR);
    }
    let cscd_len = be_u(&data[2..4]) as usize;
    let seg_len = be_u(&data[8..12]) as usize;
    let inline_len = be_u(&data[12..16]) as usize;
    if inline_len != 0 {
        return param(sense::INVALID_FIELD_IN_PARAMETER_LIST); // no inline data segments
    }
    if 16 + cscd_len + seg_len != len || !cscd_len.is_multiple_of(32) {
        return param(sense::PARAMETER_LIST_LENGTH_ERROR);
    }
    if cscd_len / 32 > MAX_CSCD_DESCRIPTORS as usize {
        return param(TOO_MANY_CSCD);
    }
    // CSCD descriptors: each names a LUN by its NAA designator.
    let own = naa(&lun.cfg);
    let mut targets = Vec::new();
    for d in data[16..16 + cscd_len].chunks(32) {
        if d[0] != CSCD_IDENTIFICATION {
            return param(UNSUPPORTED_CSCD_TYPE);
        }
        // Peripheral device type 0 (disk); designator: binary, LU, NAA, 16 bytes.
        if d[1] & 0x1f != 0 || d[4] & 0x0f != 1 || d[5] & 0x3f != 0x03 || d[7] != 16 {
            return param(sense::INVALID_FIELD_IN_PARAMETER_LIST);
        }
        let id = &d[8..24];
        let t = if *id == own {
            Target::Own
        } else {
            match find(id) {
                Some((l, b)) => Target::Other(l, b),
                None => return ScsiResponse::error(TARGET_NOT_REACHABLE),
            }
        };
        let bs = match &t {
            Target::Own => lun.cfg.block_size,
            Target::Other(l, _) => l.cfg.block_size,
        };
        // DISK BLOCK LENGTH must be the target's block size.
        if be_u(&d[29..32]) != bs as u64 {
            return param(sense::INVALID_FIELD_IN_PARAMETER_LIST);
        }
        targets.push(t);
    }
    let view = |i: usize| -> (&LunState, &dyn BlockBackend) {
        match &targets[i] {
            Target::Own => (lun, be),
            Target::Other(l, b) => (l.as_ref(), b.as_ref()),
        }
    };
    // Segment descriptors, all validated before any data moves.
    let mut segments = Vec::new();
    let mut p = 16 + cscd_len;
    while p < len {
        if segments.len() == MAX_SEGMENT_DESCRIPTORS as usize {
            return param(TOO_MANY_SEGMENTS);
        }
        if p + 4 > len {
            return param(sense::PARAMETER_LIST_LENGTH_ERROR);
        }
        let d = &data[p..];
        if d[0] != SEGMENT_BLOCK_TO_BLOCK {
            return param(UNSUPPORTED_SEGMENT_TYPE);
        }
        if be_u(&d[2..4]) != 0x18 || p + 28 > len {
            return param(sense::PARAMETER_LIST_LENGTH_ERROR);
        }
        let s = Segment {
            src: be_u(&d[4..6]) as usize,
            dst: be_u(&d[6..8]) as usize,
            blocks: Blocks(be_u(&d[10..12])),
            src_lba: Lba(be_u(&d[12..20])),
            dst_lba: Lba(be_u(&d[20..28])),
        };
        if s.src >= targets.len() || s.dst >= targets.len() {
            return param(sense::INVALID_FIELD_IN_PARAMETER_LIST);
        }
        let (sl, dl) = (view(s.src).0, view(s.dst).0);
        if sl.cfg.block_size != dl.cfg.block_size {
            return param(sense::INVALID_FIELD_IN_PARAMETER_LIST);
        }
        if let Err(r) = sl.check_range(s.src_lba, s.blocks) {
            return r;
        }
        if let Err(r) = dl.check_range(s.dst_lba, s.blocks) {
            return r;
        }
        segments.push(s);
        p += 28;
    }
    // Every involved LUN's I/O lock, shared, in address order.
    let mut luns: Vec<&LunState> = (0..targets.len()).map(|i| view(i).0).collect();
    luns.sort_by_key(|l| *l as *const LunState as usize);
    luns.dedup_by_key(|l| *l as *const LunState as usize);
    let _held: Vec<RwLockReadGuard<'_, ()>> = luns
        .iter()
        .map(|l| l.io.read().unwrap_or_else(PoisonError::into_inner))
        .collect();
    for s in &segments {
        let (sl, sb) = view(s.src);
        let (dl, db) = view(s.dst);
        if let Err(r) = copy_blocks(sl, sb, s.src_lba, dl, db, s.dst_lba, s.blocks) {
            return r;
        }
    }
    ScsiResponse::good(Vec::new())
}

/// Copies `blocks` blocks; backwards when the ranges overlap on one LUN with the
/// destination after the source, so every block is read before it is overwritten.
#[allow(clippy::too_many_arguments)]
fn copy_blocks(
    sl: &LunState,
    sb: &dyn BlockBackend,
    src: Lba,
    dl: &LunState,
    db: &dyn BlockBackend,
    dst: Lba,
    blocks: Blocks,
) -> Result<(), ScsiResponse> {
    let bs = sl.cfg.block_size as u64;
    let per = (CHUNK / bs).max(1);
    let same = std::ptr::eq(sl, dl);
    let backwards = same && dst > src && dst < src.after(blocks);
    let mut buf = vec![0u8; (per.min(blocks.0) * bs) as usize];
    let mut done = 0;
    while done < blocks.0 {
        let n = per.min(blocks.0 - done);
        let off = Blocks(if backwards { blocks.0 - done - n } else { done });
        let chunk = &mut buf[..(n * bs) as usize];
        let from = src.after(off);
        sb.read(from.offset(bs), &mut [&mut *chunk])
            .map_err(|e| read_error(e, from, bs))?;
        let r = super::write_or_error(db, dst.after(off), &[chunk], !dl.write_cache(), bs);
        if r.status != super::GOOD {
            return Err(r);
        }
        done += n;
    }
    Ok(())
}

/// RECEIVE COPY RESULTS / OPERATING PARAMETERS (SPC-4 6.18.4).
pub(super) fn operating_parameters(cfg: &LunConfig) -> Vec<u8> {
    let mut d = vec![0u8; 46];
    d[0..4].copy_from_slice(&42u32.to_be_bytes()); // AVAILABLE DATA
    d[4] = 0x01; // SNLID: lists without an identifier are accepted
    d[8..10].copy_from_slice(&MAX_CSCD_DESCRIPTORS.to_be_bytes());
    d[10..12].copy_from_slice(&MAX_SEGMENT_DESCRIPTORS.to_be_bytes());
    d[12..16].copy_from_slice(&MAX_LIST_LEN.to_be_bytes());
    d[16..20].copy_from_slice(&max_segment_len(cfg).to_be_bytes());
    d[34..36].copy_from_slice(&1u16.to_be_bytes()); // TOTAL CONCURRENT COPIES
    d[36] = 1; // MAXIMUM CONCURRENT COPIES
    d[37] = cfg.block_size.trailing_zeros() as u8; // DATA SEGMENT GRANULARITY
    d[43] = 2; // IMPLEMENTED DESCRIPTOR LIST LENGTH
    d[44] = SEGMENT_BLOCK_TO_BLOCK;
    d[45] = CSCD_IDENTIFICATION;
    d
}

/// Bytes one segment descriptor can move (its block count is 16 bits).
fn max_segment_len(cfg: &LunConfig) -> u32 {
    (0xffff_u64 * cfg.block_size as u64).min(u32::MAX as u64) as u32
}

/// The Third-party Copy VPD page body (0x8F, SPC-4 7.8.17): the five descriptors a
/// LID1 copy manager must report.
pub(super) fn vpd_8f(cfg: &LunConfig) -> Vec<u8> {
    fn desc(v: &mut Vec<u8>, kind: u16, body: &[u8]) {
        let mut b = body.to_vec();
        b.resize(body.len().div_ceil(4) * 4, 0);
        v.extend_from_slice(&kind.to_be_bytes());
        v.extend_from_slice(&(b.len() as u16).to_be_bytes());
        v.extend(b);
    }
    let mut v = Vec::new();
    // Supported Commands: 83h/00h EXTENDED COPY (LID1), 84h/03h RECEIVE COPY
    // OPERATING PARAMETERS.
    desc(&mut v, 0x0001, &[6, 0x83, 1, 0x00, 0x84, 1, 0x03]);
    // Parameter Data.
    let mut pd = [0u8; 28];
    pd[4..6].copy_from_slice(&MAX_CSCD_DESCRIPTORS.to_be_bytes());
    pd[6..8].copy_from_slice(&MAX_SEGMENT_DESCRIPTORS.to_be_bytes());
    pd[8..12].copy_from_slice(&MAX_LIST_LEN.to_be_bytes());
    desc(&mut v, 0x0004, &pd);
    // Supported Descriptors: 02h block to block, E4h identification.
    desc(
        &mut v,
        0x0008,
        &[2, SEGMENT_BLOCK_TO_BLOCK, CSCD_IDENTIFICATION],
    );
    // Supported CSCD Descriptor IDs: none besides 0000h.
    desc(&mut v, 0x000c, &[0, 0]);
    // General Copy Operations.
    let mut g = [0u8; 32];
    g[0..4].copy_from_slice(&1u32.to_be_bytes()); // TOTAL CONCURRENT COPIES
    g[4..8].copy_from_slice(&1u32.to_be_bytes()); // MAXIMUM IDENTIFIED CONCURRENT COPIES
    g[8..12].copy_from_slice(&max_segment_len(cfg).to_be_bytes());
    g[12] = cfg.block_size.trailing_zeros() as u8; // DATA SEGMENT GRANULARITY
    desc(&mut v, 0x8001, &g);
    v
}
