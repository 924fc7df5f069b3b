//! Unit tests of the SCSI emulation against an in-memory backend.

use super::*;
use cdb::{build10 as rw10, build16 as rw16};
use rand::{Rng, SeedableRng};
use sense::key;
use std::sync::Mutex;

struct Mem {
    data: Mutex<Vec<u8>>,
    fail_at: Option<u64>,
    flushes: Mutex<u32>,
    fua_writes: Mutex<u32>,
    /// Whether the non-blocking calls serve (as an engine with the data in RAM).
    inline: bool,
    /// Byte offset that every write stores flipped (a medium that loses bits).
    corrupt_at: Option<u64>,
    /// What `fail_at` failures are: the medium's or the target's.
    fail_kind: IoErrorKind,
}

impl Mem {
    fn new(size: usize) -> Self {
        Mem {
            data: Mutex::new(vec![0; size]),
            fail_at: None,
            flushes: Mutex::new(0),
            fua_writes: Mutex::new(0),
            inline: false,
            corrupt_at: None,
            fail_kind: IoErrorKind::Medium,
        }
    }
    fn failing(size: usize, at: u64) -> Self {
        Mem {
            fail_at: Some(at),
            ..Mem::new(size)
        }
    }
    fn check(&self, off: u64, len: u64) -> Result<(), IoError> {
        match self.fail_at {
            Some(f) if f >= off && f < off + len => Err(IoError {
                offset: Some(f),
                message: "injected".into(),
                kind: self.fail_kind,
            }),
            _ => Ok(()),
        }
    }
}

impl BlockBackend for Mem {
    fn read(&self, offset: u64, bufs: &mut [&mut [u8]]) -> Result<(), IoError> {
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        self.check(offset, total as u64)?;
        let d = self.data.lock().unwrap();
        let mut at = offset as usize;
        for b in bufs.iter_mut() {
            b.copy_from_slice(&d[at..at + b.len()]);
            at += b.len();
        }
        Ok(())
    }
    fn write(&self, offset: u64, data: &[&[u8]], fua: bool) -> Result<(), IoError> {
        let total: usize = data.iter().map(|b| b.len()).sum();
        self.check(offset, total as u64)?;
        if fua {
            *self.fua_writes.lock().unwrap() += 1;
        }
        let mut d = self.data.lock().unwrap();
        let mut at = offset as usize;
        for p in data {
            d[at..at + p.len()].copy_from_slice(p);
            at += p.len();
        }
        if let Some(c) = self
            .corrupt_at
            .filter(|&c| c >= offset && c < offset + total as u64)
        {
            d[c as usize] ^= 0xff;
        }
        Ok(())
    }
    fn flush(&self) -> Result<(), IoError> {
        *self.flushes.lock().unwrap() += 1;
        Ok(())
    }
    fn discard(&self, offset: u64, len: u64) -> Result<(), IoError> {
        self.check(offset, len)?;
        self.data.lock().unwrap()[offset as usize..(offset + len) as usize].fill(0);
        Ok(())
    }
    fn try_read(&self, offset: u64, bufs: &mut [&mut [u8]]) -> Option<Result<(), IoError>> {
        self.inline.then(|| self.read(offset, bufs))
    }
    fn try_write(&self, offset: u64, data: &[&[u8]]) -> Option<Result<(), IoError>> {
        self.inline.then(|| self.write(offset, data, false))
    }
}

#[test]
fn try_execute_serves_only_what_needs_no_blocking_call() {
    let l = lun(512);
    let data = vec![0x5au8; 1024];
    let write = rw10(0x2a, 8, 2, 0);
    let read = rw10(0x28, 8, 2, 0);
    // A backend that cannot serve without blocking: I/O commands are left alone.
    let m = Mem::new((BLOCKS * 512) as usize);
    assert!(try_execute(&l, &write, &data, 0, &m).is_none());
    assert!(try_execute(&l, &read, &[], 1024, &m).is_none());
    assert!(m.data.lock().unwrap().iter().all(|&b| b == 0));
    // Commands without I/O, and bad ones, are answered at once.
    let inq = try_execute(&l, &[0x12, 0, 0, 0, 96, 0], &[], 96, &m).expect("inquiry");
    assert_eq!(inq.status, GOOD);
    let bad =
        try_execute(&l, &rw10(0x2a, BLOCKS as u32, 1, 0), &data[..512], 0, &m).expect("range");
    assert_eq!(sense_of(&bad), (key::ILLEGAL_REQUEST, 0x21, 0));
    // A backend with the data in RAM: plain writes and reads are served...
    let m = Mem {
        inline: true,
        ..Mem::new((BLOCKS * 512) as usize)
    };
    assert_eq!(try_execute(&l, &write, &data, 0, &m).unwrap().status, GOOD);
    let r = try_execute(&l, &read, &[], 1024, &m).unwrap();
    assert_eq!((r.status, &r.data_in[..]), (GOOD, &data[..]));
    // ...but FUA writes, flushes and unmaps wait for devices, so never here.
    assert!(try_execute(&l, &rw10(0x2a, 8, 2, 0x08), &data, 0, &m).is_none());
    assert!(try_execute(&l, &rw10(0x35, 0, 0, 0), &[], 0, &m).is_none());
    assert_eq!(
        *m.flushes.lock().unwrap() + *m.fua_writes.lock().unwrap(),
        0
    );
    let mut unmap = vec![0u8; 24];
    unmap[1] = 22;
    unmap[3] = 16;
    unmap[8..16].copy_from_slice(&8u64.to_be_bytes());
    unmap[16..20].copy_from_slice(&2u32.to_be_bytes());
    assert!(try_execute(&l, &[0x42, 0, 0, 0, 0, 0, 0, 0, 24, 0], &unmap, 0, &m).is_none());
    assert_eq!(&m.data.lock().unwrap()[8 * 512..10 * 512], &data[..]);
}

const BLOCKS: u64 = 2048;

fn lun(bs: u32) -> LunState {
    LunState::new(LunConfig::new("serial-123", bs, BLOCKS))
}

fn sense_of(r: &ScsiResponse) -> (u8, u8, u8) {
    assert_eq!(r.status, CHECK_CONDITION, "{r:?}");
    (r.sense[2], r.sense[12], r.sense[13])
}

fn info(r: &ScsiResponse) -> u32 {
    assert!(r.sense[0] & 0x80 != 0, "VALID");
    u32::from_be_bytes(r.sense[3..7].try_into().unwrap())
}

#[test]
fn write_then_read_every_flavour() {
    for bs in [512u32, 4096] {
        let l = lun(bs);
        let m = Mem::new((BLOCKS * bs as u64) as usize);
        let b = bs as usize;
        let cases: Vec<(Vec<u8>, Vec<u8>, u64, usize)> = vec![
            (vec![0x0a, 0, 0, 5, 2, 0], vec![0x08, 0, 0, 5, 2, 0], 5, 2),
            (rw10(0x2a, 10, 3, 0x08), rw10(0x28, 10, 3, 0), 10, 3),
            (
                vec![0xaa, 0, 0, 0, 0, 20, 0, 0, 0, 4, 0, 0],
                vec![0xa8, 0, 0, 0, 0, 20, 0, 0, 0, 4, 0, 0],
                20,
                4,
            ),
            (
                rw16(0x8a, BLOCKS - 1, 1, 0),
                rw16(0x88, BLOCKS - 1, 1, 0),
                BLOCKS - 1,
                1,
            ),
        ];
        for (w, r, lba, n) in cases {
            let data: Vec<u8> = (0..n * b).map(|i| (i as u64 * 7 + lba) as u8).collect();
            let resp = execute(&l, &w, &data, 0, &m);
            assert_eq!(resp.status, GOOD, "{w:?}");
            let resp = execute(&l, &r, &[], n * b, &m);
            assert_eq!(resp.status, GOOD);
            assert_eq!(resp.data_in, data);
            assert_eq!(
                &m.data.lock().unwrap()[lba as usize * b..][..n * b],
                &data[..]
            );
        }
        assert!(
            *m.fua_writes.lock().unwrap() >= 1,
            "FUA bit reaches the backend"
        );
    }
}

#[test]
fn read6_length_zero_means_256_blocks_and_ranges_are_checked() {
    let l = lun(512);
    let m = Mem::new((BLOCKS * 512) as usize);
    assert_eq!(
        execute(&l, &[0x08, 0, 0, 0, 0, 0], &[], 256 * 512, &m)
            .data_in
            .len(),
        256 * 512
    );
    let r = execute(&l, &rw16(0x88, BLOCKS, 1, 0), &[], 512, &m);
    assert_eq!(sense_of(&r), (key::ILLEGAL_REQUEST, 0x21, 0));
    let r = execute(&l, &rw16(0x88, u64::MAX, 2, 0), &[], 1024, &m);
    assert_eq!(
        sense_of(&r),
        (key::ILLEGAL_REQUEST, 0x21, 0),
        "LBA+len overflow"
    );
    let r = execute(&l, &rw10(0x28, 0, 0, 0), &[], 0, &m);
    assert_eq!(r.status, GOOD, "zero-length READ(10) transfers nothing");
    let r = execute(&l, &rw10(0x2a, 0, 2, 0), &[0u8; 512], 0, &m);
    assert_eq!(
        sense_of(&r),
        (key::ILLEGAL_REQUEST, 0x0e, 0x03),
        "data-out shorter than the CDB: INVALID FIELD IN COMMAND IU, as LIO's fileio"
    );
    let r = execute(&l, &rw10(0x2a, 0, 1, 0), &[0u8; 1024], 0, &m);
    assert_eq!(
        sense_of(&r),
        (key::ILLEGAL_REQUEST, 0x0e, 0x03),
        "data-out longer than the CDB"
    );
}

#[test]
fn io_errors_are_medium_errors_with_the_failing_lba() {
    let l = lun(512);
    let m = Mem::failing((BLOCKS * 512) as usize, 100 * 512 + 17);
    let r = execute(&l, &rw10(0x28, 96, 8, 0), &[], 4096, &m);
    assert_eq!(sense_of(&r), (key::MEDIUM_ERROR, 0x11, 0));
    assert_eq!(info(&r), 100);
    let r = execute(&l, &rw10(0x2a, 99, 2, 0), &[1u8; 1024], 0, &m);
    assert_eq!(sense_of(&r), (key::MEDIUM_ERROR, 0x0c, 0));
    assert_eq!(info(&r), 100);
}

#[test]
fn a_failed_target_is_a_hardware_error_not_a_medium_error() {
    let l = lun(512);
    let m = Mem {
        fail_kind: IoErrorKind::Target,
        ..Mem::failing((BLOCKS * 512) as usize, 100 * 512)
    };
    for r in [
        execute(&l, &rw10(0x28, 96, 8, 0), &[], 4096, &m),
        execute(&l, &rw10(0x2a, 99, 2, 0), &[1u8; 1024], 0, &m),
    ] {
        assert_eq!(sense_of(&r), (key::HARDWARE_ERROR, 0x44, 0));
    }
}

#[test]
fn unknown_opcodes_and_short_cdbs() {
    let l = lun(512);
    let m = Mem::new(1 << 20);
    for c in [
        &[0xc5u8, 0, 0, 0, 0, 0][..],
        &[0x04, 0, 0, 0, 0, 0],
        &[0x7f, 0, 0, 0, 0, 0, 0, 0],
    ] {
        assert_eq!(
            sense_of(&execute(&l, c, &[], 0, &m)),
            (key::ILLEGAL_REQUEST, 0x20, 0)
        );
    }
    assert_eq!(
        sense_of(&execute(&l, &[0x28, 0], &[], 0, &m)),
        (key::ILLEGAL_REQUEST, 0x24, 0)
    );
    assert_eq!(
        sense_of(&execute(&l, &[], &[], 0, &m)),
        (key::ILLEGAL_REQUEST, 0x20, 0)
    );
}

#[test]
fn inquiry_standard_and_vpd_pages() {
    let l = lun(4096);
    let m = Mem::new(1 << 20);
    let r = execute(&l, &[0x12, 0, 0, 0, 96, 0], &[], 96, &m);
    assert_eq!(r.data_in.len(), 96);
    assert_eq!(r.data_in[4], 91, "additional length");
    assert_eq!(&r.data_in[8..16], b"LIO-ORG ");
    assert_eq!(&r.data_in[16..18], b"lc");
    assert_eq!(r.data_in[2], 6);
    // Version descriptors: SAM-5, SPC-4, SBC-3, then zeros.
    assert_eq!(
        &r.data_in[58..66],
        &[0x00, 0xa0, 0x04, 0x60, 0x04, 0xc0, 0, 0]
    );
    assert_eq!(
        execute(&l, &[0x12, 0, 0, 0, 5, 0], &[], 96, &m)
            .data_in
            .len(),
        5,
        "allocation length"
    );
    let pages = execute(&l, &[0x12, 1, 0, 0, 255, 0], &[], 255, &m).data_in;
    assert_eq!(&pages[4..], &[0x00, 0x80, 0x83, 0x8f, 0xb0, 0xb1, 0xb2]);
    let sn = execute(&l, &[0x12, 1, 0x80, 0, 255, 0], &[], 255, &m).data_in;
    assert_eq!(&sn[4..], b"serial-123");
    let id = execute(&l, &[0x12, 1, 0x83, 0, 255, 0], &[], 255, &m).data_in;
    assert_eq!(
        (id[4] & 0x0f, id[5] & 0x0f, id[7]),
        (1, 3, 16),
        "NAA designator first"
    );
    let bl = execute(&l, &[0x12, 1, 0xb0, 0, 255, 0], &[], 255, &m).data_in;
    assert_eq!(u16::from_be_bytes([bl[2], bl[3]]), 0x3c, "page length");
    assert_eq!(bl[5], 255, "maximum compare and write length");
    assert_eq!(
        u32::from_be_bytes(bl[8..12].try_into().unwrap()),
        (1 << 30) / 4096,
        "max transfer: the default TCMU data area"
    );
    assert_eq!(
        u32::from_be_bytes(bl[12..16].try_into().unwrap()),
        128,
        "optimal transfer: hw_max_sectors"
    );
    assert_eq!(
        u32::from_be_bytes(bl[24..28].try_into().unwrap()),
        256,
        "max unmap descriptors"
    );
    let lbp = execute(&l, &[0x12, 1, 0xb2, 0, 255, 0], &[], 255, &m).data_in;
    assert_eq!(lbp[5] & 0xe4, 0xe4);
    assert_eq!(
        sense_of(&execute(&l, &[0x12, 1, 0x99, 0, 255, 0], &[], 255, &m)),
        (key::ILLEGAL_REQUEST, 0x24, 0)
    );
    assert_eq!(
        sense_of(&execute(&l, &[0x12, 2, 0, 0, 255, 0], &[], 255, &m)),
        (key::ILLEGAL_REQUEST, 0x24, 0)
    );
    assert_eq!(
        sense_of(&execute(&l, &[0x12, 0, 0x80, 0, 255, 0], &[], 255, &m)),
        (key::ILLEGAL_REQUEST, 0x24, 0)
    );
}

#[test]
fn read_capacity_10_and_16() {
    let l = lun(512);
    let m = Mem::new(1 << 20);
    let r = execute(&l, &[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[], 8, &m).data_in;
    assert_eq!(
        u32::from_be_bytes(r[0..4].try_into().unwrap()),
        BLOCKS as u32 - 1
    );
    assert_eq!(u32::from_be_bytes(r[4..8].try_into().unwrap()), 512);
    let mut c = [0u8; 16];
    c[0] = 0x9e;
    c[1] = 0x10;
    c[13] = 32;
    let r = execute(&l, &c, &[], 32, &m).data_in;
    assert_eq!(u64::from_be_bytes(r[0..8].try_into().unwrap()), BLOCKS - 1);
    assert_eq!(r[14] & 0xc0, 0xc0, "LBPME and LBPRZ");
    let big = LunState::new(LunConfig::new("x", 512, 1 << 33));
    let r = execute(&big, &[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[], 8, &m).data_in;
    assert_eq!(&r[0..4], &[0xff; 4], "capacity beyond 32 bits");
}

#[test]
fn resize_reports_capacity_changed_once_and_moves_the_range() {
    let l = lun(512);
    let m = Mem {
        inline: true,
        ..Mem::new((BLOCKS * 2 * 512) as usize)
    };
    let tur = [0u8; 6];
    let cap10 = [0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    let beyond = rw10(0x2a, BLOCKS as u32, 1, 0);
    let data = vec![7u8; 512];
    assert_eq!(
        sense_of(&execute(&l, &beyond, &data, 0, &m)),
        (key::ILLEGAL_REQUEST, 0x21, 0)
    );
    l.resize(BLOCKS * 2);
    // INQUIRY and REQUEST SENSE pass; the next other command gets the unit attention,
    // even when it is answered on the inline path, and only once.
    assert_eq!(
        execute(&l, &[0x12, 0, 0, 0, 96, 0], &[], 96, &m).status,
        GOOD
    );
    assert_eq!(
        execute(&l, &[0x03, 0, 0, 0, 18, 0], &[], 18, &m).status,
        GOOD
    );
    let ua = try_execute(&l, &beyond, &data, 0, &m).expect("answered at once");
    assert_eq!(sense_of(&ua), (key::UNIT_ATTENTION, 0x2a, 0x09));
    assert_eq!(execute(&l, &tur, &[], 0, &m).status, GOOD);
    let r = execute(&l, &cap10, &[], 8, &m).data_in;
    assert_eq!(
        u32::from_be_bytes(r[0..4].try_into().unwrap()),
        BLOCKS as u32 * 2 - 1
    );
    assert_eq!(execute(&l, &beyond, &data, 0, &m).status, GOOD);
    // Setting the same size again is no change; shrinking is one.
    l.resize(BLOCKS * 2);
    assert_eq!(execute(&l, &tur, &[], 0, &m).status, GOOD);
    l.resize(BLOCKS);
    assert_eq!(
        sense_of(&execute(&l, &tur, &[], 0, &m)),
        (key::UNIT_ATTENTION, 0x2a, 0x09)
    );
    assert_eq!(
        sense_of(&execute(&l, &beyond, &data, 0, &m)),
        (key::ILLEGAL_REQUEST, 0x21, 0)
    );
}

#[test]
fn write_cache_off_makes_every_write_fua() {
    let l = lun(512);
    let m = Mem::new((BLOCKS * 512) as usize);
    let data = vec![1u8; 512];
    assert_eq!(execute(&l, &rw10(0x2a, 0, 1, 0), &data, 0, &m).status, GOOD);
    assert_eq!(*m.fua_writes.lock().unwrap(), 0);
    l.set_write_cache(false);
    let ms = execute(&l, &[0x1a, 0, 0x08, 0, 64, 0], &[], 64, &m).data_in;
    assert_eq!(ms[4 + ms[3] as usize + 2] & 0x04, 0, "WCE clear: {ms:?}");
    assert_eq!(execute(&l, &rw10(0x2a, 0, 1, 0), &data, 0, &m).status, GOOD);
    assert_eq!(*m.fua_writes.lock().unwrap(), 1);
}

#[test]
fn mode_sense_reports_wce_and_dpofua_and_mode_select_toggles_wce() {
    let l = lun(512);
    let m = Mem::new((BLOCKS * 512) as usize);
    let r = execute(&l, &[0x1a, 0, 0x08, 0, 255, 0], &[], 255, &m).data_in;
    assert_eq!(r[2] & 0x10, 0x10, "DPOFUA");
    assert_eq!(r[3], 8, "block descriptor");
    assert_eq!(r[4 + 8], 0x08);
    assert_eq!(r[4 + 8 + 2] & 0x04, 0x04, "WCE");
    let r10 = execute(
        &l,
        &[0x5a, 0x08, 0x3f, 0, 0, 0, 0, 0x01, 0, 0],
        &[],
        256,
        &m,
    )
    .data_in;
    assert_eq!(u16::from_be_bytes([r10[6], r10[7]]), 0, "DBD");
    assert_eq!(r10[8], 0x08);
    assert_eq!(r10[8 + 20], 0x0a);
    assert_eq!(
        sense_of(&execute(&l, &[0x1a, 0, 0xc8, 0, 255, 0], &[], 255, &m)),
        (key::ILLEGAL_REQUEST, 0x39, 0)
    );
    assert_eq!(
        sense_of(&execute(&l, &[0x1a, 0, 0x19, 0, 255, 0], &[], 255, &m)),
        (key::ILLEGAL_REQUEST, 0x24, 0)
    );
    // MODE SELECT(6): header + caching page with WCE cleared.
    let mut p = vec![0u8, 0, 0, 0];
    let mut page = caching_page(false, false);
    p.append(&mut page);
    let r = execute(&l, &[0x15, 0x10, 0, 0, p.len() as u8, 0], &p, 0, &m);
    assert_eq!(r.status, GOOD, "{r:?}");
    assert!(!l.write_cache());
    let r = execute(&l, &[0x1a, 0x08, 0x08, 0, 255, 0], &[], 255, &m).data_in;
    assert_eq!(r[4 + 2] & 0x04, 0);
    // With WCE off every write is forced durable.
    let before = *m.fua_writes.lock().unwrap();
    execute(&l, &rw10(0x2a, 0, 1, 0), &[1u8; 512], 0, &m);
    assert_eq!(*m.fua_writes.lock().unwrap(), before + 1);
    // Changing anything else is refused; saving is refused.
    let mut bad = p.clone();
    bad[4 + 3] = 0xff;
    assert_eq!(
        sense_of(&execute(
            &l,
            &[0x15, 0x10, 0, 0, bad.len() as u8, 0],
            &bad,
            0,
            &m
        )),
        (key::ILLEGAL_REQUEST, 0x26, 0)
    );
    assert_eq!(
        sense_of(&execute(
            &l,
            &[0x15, 0x11, 0, 0, p.len() as u8, 0],
            &p,
            0,
            &m
        )),
        (key::ILLEGAL_REQUEST, 0x39, 0)
    );
    assert_eq!(
        sense_of(&execute(&l, &[0x15, 0x10, 0, 0, 40, 0], &p, 0, &m)),
        (key::ILLEGAL_REQUEST, 0x1a, 0)
    );
    let mut on = p.clone();
    on[4 + 2] = 0x04;
    assert_eq!(
        execute(&l, &[0x15, 0x10, 0, 0, on.len() as u8, 0], &on, 0, &m).status,
        GOOD
    );
    assert!(l.write_cache());
}

#[test]
fn sync_cache_flushes_and_checks_the_range() {
    let l = lun(512);
    let m = Mem::new(1 << 20);
    assert_eq!(
        execute(&l, &[0x35, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[], 0, &m).status,
        GOOD
    );
    let mut c = [0u8; 16];
    c[0] = 0x91;
    assert_eq!(execute(&l, &c, &[], 0, &m).status, GOOD);
    assert_eq!(*m.flushes.lock().unwrap(), 2);
    assert_eq!(
        sense_of(&execute(
            &l,
            &rw10(0x35, BLOCKS as u32 + 1, 0, 0),
            &[],
            0,
            &m
        )),
        (key::ILLEGAL_REQUEST, 0x21, 0)
    );
}

#[test]
fn write_same_replicates_or_unmaps() {
    let l = lun(512);
    let m = Mem::new((BLOCKS * 512) as usize);
    let block: Vec<u8> = (0..512).map(|i| i as u8).collect();
    assert_eq!(
        execute(&l, &rw10(0x41, 4, 3, 0), &block, 0, &m).status,
        GOOD
    );
    assert_eq!(
        &m.data.lock().unwrap()[4 * 512..7 * 512],
        &block.repeat(3)[..]
    );
    assert_eq!(
        execute(&l, &rw10(0x41, 4, 2, 0x08), &[0u8; 512], 0, &m).status,
        GOOD
    );
    assert!(m.data.lock().unwrap()[4 * 512..6 * 512]
        .iter()
        .all(|&b| b == 0));
    assert_eq!(&m.data.lock().unwrap()[6 * 512..7 * 512], &block[..]);
    assert_eq!(
        execute(&l, &rw16(0x93, 6, 1, 0x09), &[], 0, &m).status,
        GOOD,
        "NDOB + UNMAP"
    );
    assert!(m.data.lock().unwrap()[6 * 512..7 * 512]
        .iter()
        .all(|&b| b == 0));
    assert_eq!(
        sense_of(&execute(&l, &rw10(0x41, 0, 0, 0), &block, 0, &m)),
        (key::ILLEGAL_REQUEST, 0x24, 0),
        "WSNZ"
    );
    assert_eq!(
        sense_of(&execute(&l, &rw10(0x41, 0, 1, 0), &block[..100], 0, &m)),
        (key::ILLEGAL_REQUEST, 0x24, 0)
    );
    assert_eq!(
        sense_of(&execute(&l, &rw16(0x93, BLOCKS - 1, 2, 0), &block, 0, &m)),
        (key::ILLEGAL_REQUEST, 0x21, 0)
    );
    // A large WRITE SAME goes in bounded chunks.
    assert_eq!(
        execute(&l, &rw16(0x93, 0, BLOCKS as u32, 0), &block, 0, &m).status,
        GOOD
    );
    assert_eq!(
        &m.data.lock().unwrap()[(BLOCKS as usize - 1) * 512..],
        &block[..]
    );
}

fn unmap_params(descs: &[(u64, u32)]) -> Vec<u8> {
    let mut p = vec![0u8; 8];
    let bd = (descs.len() * 16) as u16;
    p[0..2].copy_from_slice(&(bd + 6).to_be_bytes());
    p[2..4].copy_from_slice(&bd.to_be_bytes());
    for (lba, n) in descs {
        p.extend_from_slice(&lba.to_be_bytes());
        p.extend_from_slice(&n.to_be_bytes());
        p.extend_from_slice(&[0; 4]);
    }
    p
}

#[test]
fn unmap_parameter_lists() {
    let l = lun(512);
    let m = Mem::new((BLOCKS * 512) as usize);
    m.data.lock().unwrap().fill(0xaa);
    let cdb = |len: usize| vec![0x42, 0, 0, 0, 0, 0, 0, (len >> 8) as u8, len as u8, 0];
    let p = unmap_params(&[(0, 2), (10, 1), (20, 0)]);
    assert_eq!(execute(&l, &cdb(p.len()), &p, 0, &m).status, GOOD);
    {
        let d = m.data.lock().unwrap();
        assert!(d[..1024].iter().all(|&b| b == 0));
        assert!(d[1024..5120].iter().all(|&b| b == 0xaa));
        assert!(d[5120..5632].iter().all(|&b| b == 0));
    }
    assert_eq!(execute(&l, &cdb(0), &[], 0, &m).status, GOOD, "empty list");
    let p = unmap_params(&[(BLOCKS - 1, 2)]);
    assert_eq!(
        sense_of(&execute(&l, &cdb(p.len()), &p, 0, &m)),
        (key::ILLEGAL_REQUEST, 0x21, 0)
    );
    let mut p = unmap_params(&[(0, 1)]);
    p[3] = 15; // descriptor length not a multiple of 16
    assert_eq!(
        sense_of(&execute(&l, &cdb(p.len()), &p, 0, &m)),
        (key::ILLEGAL_REQUEST, 0x1a, 0)
    );
    let p = unmap_params(&[(0, 1)]);
    assert_eq!(
        sense_of(&execute(&l, &cdb(p.len() + 8), &p, 0, &m)),
        (key::ILLEGAL_REQUEST, 0x1a, 0)
    );
    let many: Vec<(u64, u32)> = (0..300).map(|i| (i, 1)).collect();
    let p = unmap_params(&many);
    assert_eq!(
        sense_of(&execute(&l, &cdb(p.len()), &p, 0, &m)),
        (key::ILLEGAL_REQUEST, 0x26, 0)
    );
    let mut anchor = cdb(24);
    anchor[1] = 1;
    assert_eq!(
        sense_of(&execute(&l, &anchor, &unmap_params(&[(0, 1)]), 0, &m)),
        (key::ILLEGAL_REQUEST, 0x24, 0)
    );
}

#[test]
fn verify_with_and_without_byte_check() {
    let l = lun(512);
    let m = Mem::new((BLOCKS * 512) as usize);
    let data = vec![3u8; 1024];
    execute(&l, &rw10(0x2a, 8, 2, 0), &data, 0, &m);
    assert_eq!(execute(&l, &rw10(0x2f, 8, 2, 0), &[], 0, &m).status, GOOD);
    assert_eq!(
        execute(&l, &rw10(0x2f, 8, 2, 0x02), &data, 0, &m).status,
        GOOD
    );
    let mut other = data.clone();
    other[700] = 4;
    let r = execute(&l, &rw16(0x8f, 8, 2, 0x02), &other, 0, &m);
    assert_eq!(sense_of(&r), (key::MISCOMPARE, 0x1d, 0));
    assert_eq!(info(&r), 700);
    assert_eq!(
        sense_of(&execute(&l, &rw10(0x2f, BLOCKS as u32, 1, 0), &[], 0, &m)),
        (key::ILLEGAL_REQUEST, 0x21, 0)
    );
}

#[test]
fn report_supported_operation_codes() {
    let l = lun(512);
    let m = Mem::new(1 << 20);
    let c = |opts: u8, opc: u8, sa: u16| {
        let mut c = vec![
            0xa3,
            0x0c,
            opts,
            opc,
            (sa >> 8) as u8,
            sa as u8,
            0,
            0,
            0x10,
            0,
            0,
            0,
        ];
        c[6..10].copy_from_slice(&4096u32.to_be_bytes());
        c
    };
    let all = execute(&l, &c(0, 0, 0), &[], 4096, &m).data_in;
    let n = u32::from_be_bytes(all[0..4].try_into().unwrap()) as usize;
    assert_eq!(n, SUPPORTED.len() * 8);
    assert!(all[4..]
        .chunks(8)
        .any(|d| d[0] == 0x8a && u16::from_be_bytes([d[6], d[7]]) == 16));
    let one = execute(&l, &c(1, 0x28, 0), &[], 4096, &m).data_in;
    assert_eq!((one[1] & 7, u16::from_be_bytes([one[2], one[3]])), (3, 10));
    assert_eq!(one[4], 0x28);
    let none = execute(&l, &c(1, 0xc0, 0), &[], 4096, &m).data_in;
    assert_eq!(none[1] & 7, 1);
    let sa = execute(&l, &c(2, 0x9e, 0x10), &[], 4096, &m).data_in;
    assert_eq!(sa[1] & 7, 3);
    assert_eq!(
        sense_of(&execute(&l, &c(1, 0x9e, 0), &[], 4096, &m)),
        (key::ILLEGAL_REQUEST, 0x24, 0)
    );
    assert_eq!(
        sense_of(&execute(&l, &c(5, 0, 0), &[], 4096, &m)),
        (key::ILLEGAL_REQUEST, 0x24, 0)
    );
}

/// Whether the transport hands the command to the backend path: a CDB that parses
/// into a command that needs the backend.
fn needs_backend(cdb: &[u8]) -> bool {
    Command::parse(cdb).is_ok_and(|c| c.needs_backend())
}

#[test]
fn needs_backend_only_for_io_commands() {
    assert!(
        !needs_backend(&[0x28, 0, 0]),
        "a short READ is refused without I/O"
    );
    assert!(needs_backend(&rw10(0x28, 0, 1, 0)));
    assert!(needs_backend(&[0x35, 0, 0, 0, 0, 0, 0, 0, 0, 0]));
    assert!(!needs_backend(&[0x12, 0, 0, 0, 36, 0]));
    assert!(!needs_backend(&[0x00; 6]));
    assert!(
        needs_backend(&rw10(0x2f, 0, 1, 0)),
        "VERIFY reads the medium"
    );
    assert!(needs_backend(&rw16(0x89, 0, 1, 0)));
    assert!(needs_backend(&rw10(0x2e, 0, 1, 0)));
    assert!(!needs_backend(&rw16(0x9e, 0, 0, 0x12)), "GET LBA STATUS");
}

#[test]
fn random_cdbs_never_panic_and_responses_are_well_formed() {
    let seed: u64 = rand::random();
    println!("seed {seed}");
    let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
    let l = LunState::new(LunConfig {
        max_unmap_blocks: 64,
        ..LunConfig::new("fuzz", 512, 4096)
    });
    let m = Mem::new(4096 * 512);
    let known: Vec<u8> = SUPPORTED.iter().map(|s| s.opcode).collect();
    for _ in 0..20000 {
        let len = [6, 10, 12, 16, rng.gen_range(0..20)][rng.gen_range(0..5)];
        let mut c: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
        if !c.is_empty() && rng.gen_bool(0.8) {
            c[0] = known[rng.gen_range(0..known.len())];
            // Keep transfers small so the test stays fast.
            for b in c.iter_mut().skip(2) {
                if rng.gen_bool(0.6) {
                    *b = 0;
                }
            }
        }
        let dlen = [0usize, 512, 1024, 24, rng.gen_range(0..2048)][rng.gen_range(0..5)];
        let data: Vec<u8> = (0..dlen).map(|_| rng.gen()).collect();
        let r = execute(&l, &c, &data, rng.gen_range(0..65536), &m);
        assert!(
            r.status == GOOD || r.status == CHECK_CONDITION,
            "seed {seed}"
        );
        if r.status == CHECK_CONDITION {
            assert_eq!(r.sense.len(), sense::SENSE_LEN, "seed {seed}");
            assert!(r.data_in.is_empty());
        } else {
            assert!(r.sense.is_empty());
            // What the command did agrees with the direction and length it declares:
            // Data-In only from a Data-In command and never more than its CDB asks
            // for; Data-Out accepted only at the CDB's length (a parameter list of
            // length 0 is no list, whatever the transport carries).
            let cmd = Command::parse(&c).expect("GOOD only for a parsed command");
            let want = cmd.transfer_length(512);
            match cmd.direction() {
                Direction::FromDevice => {
                    assert!(r.data_in.len() as u64 <= want, "seed {seed}: {cmd:?}")
                }
                Direction::ToDevice => assert!(
                    want == 0 || data.len() as u64 == want,
                    "seed {seed}: {cmd:?}"
                ),
                Direction::None => assert!(r.data_in.is_empty(), "seed {seed}: {cmd:?}"),
            }
        }
    }
}

fn read12(lba: u32, blocks: u32) -> Vec<u8> {
    let mut c = vec![0xa8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    c[2..6].copy_from_slice(&lba.to_be_bytes());
    c[6..10].copy_from_slice(&blocks.to_be_bytes());
    c
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

#[test]
fn transfers_longer_than_hw_max_sectors_are_served() {
    // hw_max_sectors (128 here) is only the optimal length: the kernel hands over any
    // command that fits its data area, and each one must be served.
    let blocks: u64 = 40_000;
    let l = LunState::new(LunConfig::new("big", 512, blocks));
    assert_eq!(l.cfg.opt_transfer_blocks, 128);
    let m = Mem::new((blocks * 512) as usize);
    for n in [129u32, 200, 256, 20_000] {
        let data = pattern(n as usize * 512, n as u8);
        let mut writes = vec![
            rw10(0x2a, 100, n.min(0xffff) as u16, 0),
            rw16(0x8a, 300, n, 0),
        ];
        let mut w12 = read12(500, n);
        w12[0] = 0xaa;
        writes.push(w12);
        for w in writes {
            let r = execute(&l, &w, &data, 0, &m);
            assert_eq!(r.status, GOOD, "{n} blocks {w:02x?}");
        }
        for (lba, rd) in [
            (100, rw10(0x28, 100, n.min(0xffff) as u16, 0)),
            (300, rw16(0x88, 300, n, 0)),
            (500, read12(500, n)),
        ] {
            let r = execute(&l, &rd, &[], data.len(), &m);
            assert_eq!(r.status, GOOD, "{n} blocks {rd:02x?}");
            assert!(r.data_in == data, "{n} blocks read back at {lba}");
        }
    }
    // READ(6)/WRITE(6) with length 0: 256 blocks.
    let data = pattern(256 * 512, 9);
    assert_eq!(
        execute(&l, &[0x0a, 0, 0, 7, 0, 0], &data, 0, &m).status,
        GOOD
    );
    let r = execute(&l, &[0x08, 0, 0, 7, 0, 0], &[], 256 * 512, &m);
    assert_eq!((r.status, r.data_in == data), (GOOD, true));
}

#[test]
fn reads_into_a_shorter_buffer_transfer_what_fits_and_complete_good() {
    let l = lun(512);
    let m = Mem::new((BLOCKS * 512) as usize);
    let data = pattern(4 * 512, 3);
    assert_eq!(
        execute(&l, &rw10(0x2a, 40, 4, 0), &data, 0, &m).status,
        GOOD
    );
    for cdb in [rw10(0x28, 40, 1, 0), read12(40, 1), rw16(0x88, 40, 1, 0)] {
        // One block, no room at all.
        let r = execute(&l, &cdb, &[], 0, &m);
        assert_eq!((r.status, r.data_in.len()), (GOOD, 0), "{cdb:02x?}");
        // One block, 200 bytes of room: the first 200 bytes.
        let r = execute(&l, &cdb, &[], 200, &m);
        assert_eq!(
            (r.status, &r.data_in[..]),
            (GOOD, &data[..200]),
            "{cdb:02x?}"
        );
    }
    for cdb in [rw10(0x28, 40, 2, 0), read12(40, 2), rw16(0x88, 40, 2, 0)] {
        // Two blocks, room for one.
        let r = execute(&l, &cdb, &[], 512, &m);
        assert_eq!(
            (r.status, &r.data_in[..]),
            (GOOD, &data[..512]),
            "{cdb:02x?}"
        );
        // Two blocks and a half of room: the two blocks (the caller reports the
        // underflow residual from the length).
        let r = execute(&l, &cdb, &[], 1280, &m);
        assert_eq!(
            (r.status, &r.data_in[..]),
            (GOOD, &data[..1024]),
            "{cdb:02x?}"
        );
    }
    // The range is still checked against the CDB's length, not the buffer's.
    let r = execute(&l, &rw10(0x28, BLOCKS as u32 - 1, 2, 0), &[], 512, &m);
    assert_eq!(sense_of(&r), (key::ILLEGAL_REQUEST, 0x21, 0));
}

fn rsoc(opts: u8, opc: u8, sa: u16) -> Vec<u8> {
    let mut c = vec![
        0xa3,
        0x0c,
        opts,
        opc,
        (sa >> 8) as u8,
        sa as u8,
        0,
        0,
        0,
        0,
        0,
        0,
    ];
    c[6..10].copy_from_slice(&8192u32.to_be_bytes());
    c
}

#[test]
fn report_opcodes_checks_service_actions_and_returns_timeouts() {
    let l = lun(512);
    let m = Mem::new(1 << 20);
    let x = |c: Vec<u8>| execute(&l, &c, &[], 8192, &m);
    // Options 1 on an opcode with service actions, 2 on one without: INVALID FIELD.
    for (o, opc) in [(1, 0x9e), (1, 0xa3), (2, 0x28), (2, 0x12)] {
        assert_eq!(
            sense_of(&x(rsoc(o, opc, 0))),
            (key::ILLEGAL_REQUEST, 0x24, 0),
            "options {o} opcode {opc:#x}"
        );
    }
    // Options 2 on an opcode that is not implemented at all: not supported.
    assert_eq!(x(rsoc(2, 0xc0, 1)).data_in, vec![0, 1, 0, 0]);
    // Options 2 with an unknown service action of a known opcode: not supported.
    assert_eq!(x(rsoc(2, 0x9e, 0x1f)).data_in, vec![0, 1, 0, 0]);
    // Options 2: GET LBA STATUS, with its usage data.
    let d = x(rsoc(2, 0x9e, 0x12)).data_in;
    assert_eq!((d[1], u16::from_be_bytes([d[2], d[3]])), (3, 16));
    assert_eq!(&d[4..6], &[0x9e, 0x12]);
    // Options 1: READ(10)'s usage data says which bits are looked at.
    let d = x(rsoc(1, 0x28, 0)).data_in;
    assert_eq!(
        &d[4..],
        &[0x28, 0x18, 0xff, 0xff, 0xff, 0xff, 0, 0xff, 0xff, 0]
    );
    // Options 3: the service action counts only where there are some.
    assert_eq!(x(rsoc(3, 0x28, 0x55)).data_in[1], 3);
    assert_eq!(x(rsoc(3, 0x9e, 0x10)).data_in[1], 3);
    assert_eq!(x(rsoc(3, 0x9e, 0x11)).data_in[1], 1);
    // Options 4..7 are reserved.
    assert_eq!(
        sense_of(&x(rsoc(4, 0x28, 0))),
        (key::ILLEGAL_REQUEST, 0x24, 0)
    );
    // RCTD, one command: CTDP set and a timeouts descriptor after the usage data.
    let d = x(rsoc(0x81, 0x2a, 0)).data_in;
    assert_eq!(d[1], 0x83);
    assert_eq!(d.len(), 4 + 10 + 12);
    assert_eq!(&d[14..18], &[0, 0x0a, 0, 0], "descriptor length 10");
    assert_eq!(u32::from_be_bytes(d[22..26].try_into().unwrap()), 30);
    // RCTD, all commands: 20-byte descriptors with CTDP.
    let d = x(rsoc(0x80, 0, 0)).data_in;
    let n = u32::from_be_bytes(d[0..4].try_into().unwrap()) as usize;
    assert_eq!(n, SUPPORTED.len() * 20);
    assert_eq!(d.len(), 4 + n);
    for desc in d[4..].chunks(20) {
        assert_eq!(desc[5] & 0x02, 0x02, "CTDP");
        assert_eq!(&desc[8..10], &[0, 0x0a]);
    }
    let names: Vec<(u8, u16)> = d[4..]
        .chunks(20)
        .map(|c| (c[0], u16::from_be_bytes([c[2], c[3]])))
        .collect();
    for want in [(0x89, 0), (0x2e, 0), (0x8e, 0), (0x9e, 0x12), (0x9e, 0x10)] {
        assert!(names.contains(&want), "{want:x?} listed");
    }
    // Without RCTD, 8-byte descriptors and no CTDP.
    let d = x(rsoc(0, 0, 0)).data_in;
    assert_eq!(
        u32::from_be_bytes(d[0..4].try_into().unwrap()) as usize,
        SUPPORTED.len() * 8
    );
    assert!(d[4..].chunks(8).all(|c| c[5] & 0x02 == 0));
}

fn caw(lba: u64, blocks: u8, flags: u8) -> Vec<u8> {
    let mut c = rw16(0x89, lba, 0, flags);
    c[13] = blocks;
    c
}

#[test]
fn compare_and_write_writes_only_on_a_match() {
    for bs in [512u32, 4096] {
        let b = bs as usize;
        let l = lun(bs);
        let m = Mem::new((BLOCKS * bs as u64) as usize);
        let old = pattern(2 * b, 1);
        let new = pattern(2 * b, 2);
        assert_eq!(execute(&l, &rw10(0x2a, 10, 2, 0), &old, 0, &m).status, GOOD);
        // A match: the second half is written.
        let r = execute(&l, &caw(10, 2, 0), &[&old[..], &new[..]].concat(), 0, &m);
        assert_eq!(r.status, GOOD);
        assert_eq!(&m.data.lock().unwrap()[10 * b..12 * b], &new[..]);
        // A miscompare at byte b + 77: MISCOMPARE, INFORMATION = 77 + b, nothing written.
        let mut stale = new.clone();
        stale[b + 77] ^= 1;
        let r = execute(&l, &caw(10, 2, 0), &[&stale[..], &old[..]].concat(), 0, &m);
        assert_eq!(sense_of(&r), (key::MISCOMPARE, 0x1d, 0));
        assert_eq!(info(&r), b as u32 + 77);
        assert_eq!(&m.data.lock().unwrap()[10 * b..12 * b], &new[..]);
        // FUA reaches the backend; so does a disabled write cache.
        let r = execute(
            &l,
            &caw(10, 1, 0x08),
            &[&new[..b], &old[..b]].concat(),
            0,
            &m,
        );
        assert_eq!(r.status, GOOD);
        assert_eq!(*m.fua_writes.lock().unwrap(), 1);
    }
    let l = LunState::new(LunConfig {
        max_compare_write_blocks: 1,
        ..LunConfig::new("caw", 512, BLOCKS)
    });
    let m = Mem::new((BLOCKS * 512) as usize);
    let z = vec![0u8; 2048];
    assert_eq!(
        sense_of(&execute(&l, &caw(0, 2, 0), &z, 0, &m)),
        (key::ILLEGAL_REQUEST, 0x24, 0),
        "beyond MAXIMUM COMPARE AND WRITE LENGTH"
    );
    assert_eq!(
        sense_of(&execute(&l, &caw(0, 1, 0), &z[..512], 0, &m)),
        (key::ILLEGAL_REQUEST, 0x0e, 0x03),
        "Data-Out must hold both halves"
    );
    assert_eq!(
        sense_of(&execute(&l, &caw(BLOCKS, 1, 0), &z[..1024], 0, &m)),
        (key::ILLEGAL_REQUEST, 0x21, 0)
    );
    assert_eq!(
        sense_of(&execute(&l, &caw(0, 1, 0x20), &z[..1024], 0, &m)),
        (key::ILLEGAL_REQUEST, 0x24, 0),
        "WRPROTECT"
    );
    assert_eq!(
        execute(&l, &caw(0, 0, 0), &[], 0, &m).status,
        GOOD,
        "0 blocks"
    );
    let bl = execute(&l, &[0x12, 1, 0xb0, 0, 255, 0], &[], 255, &m).data_in;
    assert_eq!(bl[5], 1, "advertised in the Block Limits page");
    let failing = Mem::failing((BLOCKS * 512) as usize, 5 * 512 + 3);
    let r = execute(&l, &caw(5, 1, 0), &z[..1024], 0, &failing);
    assert_eq!(sense_of(&r), (key::MEDIUM_ERROR, 0x11, 0));
    assert_eq!(info(&r), 5);
}

#[test]
fn compare_and_write_is_atomic_against_concurrent_compare_and_writes() {
    // Four threads increment one counter block with read + COMPARE AND WRITE, retrying
    // on MISCOMPARE, while a fifth writes a neighbouring block: no increment is lost.
    let l = std::sync::Arc::new(lun(512));
    let m = std::sync::Arc::new(Mem::new((BLOCKS * 512) as usize));
    const PER: u64 = 150;
    let block = |v: u64| {
        let mut b = vec![0u8; 512];
        b[..8].copy_from_slice(&v.to_be_bytes());
        b[8..].fill(v as u8);
        b
    };
    assert_eq!(
        execute(&l, &rw10(0x2a, 7, 1, 0), &block(0), 0, &*m).status,
        GOOD
    );
    let mut threads: Vec<_> = (0..4)
        .map(|_| {
            let (l, m) = (l.clone(), m.clone());
            std::thread::spawn(move || {
                let mut done = 0;
                while done < PER {
                    let cur = execute(&l, &rw10(0x28, 7, 1, 0), &[], 512, &*m).data_in;
                    let v = u64::from_be_bytes(cur[..8].try_into().unwrap());
                    let r = execute(&l, &caw(7, 1, 0), &[cur, block(v + 1)].concat(), 0, &*m);
                    match r.status {
                        GOOD => done += 1,
                        _ => assert_eq!(r.sense[2], key::MISCOMPARE),
                    }
                }
            })
        })
        .collect();
    {
        let (l, m) = (l.clone(), m.clone());
        threads.push(std::thread::spawn(move || {
            for i in 0..300u64 {
                let r = execute(&l, &rw10(0x2a, 8, 1, 0), &block(i), 0, &*m);
                assert_eq!(r.status, GOOD);
            }
        }));
    }
    for t in threads {
        t.join().unwrap();
    }
    let cur = execute(&l, &rw10(0x28, 7, 1, 0), &[], 512, &*m).data_in;
    let v = u64::from_be_bytes(cur[..8].try_into().unwrap());
    assert_eq!(v, 4 * PER, "lost increments");
    assert!(cur == block(v), "the counter block is whole");
}

#[test]
fn the_loop_thread_never_waits_for_the_io_lock() {
    let l = lun(512);
    let m = Mem {
        inline: true,
        ..Mem::new((BLOCKS * 512) as usize)
    };
    let read = rw10(0x28, 0, 1, 0);
    let write = rw10(0x2a, 0, 1, 0);
    // COMPARE AND WRITE is never served inline.
    assert!(try_execute(&l, &caw(0, 1, 0), &[0u8; 1024], 0, &m).is_none());
    // While a COMPARE AND WRITE holds the lock, reads and writes are handed over
    // (None) instead of waiting; commands without I/O are still answered.
    {
        let _excl = l.io.write().unwrap();
        assert!(try_execute(&l, &read, &[], 512, &m).is_none());
        assert!(try_execute(&l, &write, &[1u8; 512], 0, &m).is_none());
        assert!(try_execute(&l, &[0x12, 0, 0, 0, 36, 0], &[], 36, &m).is_some());
        assert!(try_execute(&l, &[0; 6], &[], 0, &m).is_some());
    }
    assert_eq!(
        m.data.lock().unwrap()[0],
        0,
        "the refused write wrote nothing"
    );
    // While reads and writes run (shared), others run inline too; a COMPARE AND WRITE
    // on a worker waits for them.
    let _shared = l.io.read().unwrap();
    assert_eq!(
        try_execute(&l, &write, &[1u8; 512], 0, &m).map(|r| r.status),
        Some(GOOD)
    );
    assert!(l.io.try_write().is_err());
}

fn get_lba_status(lba: u64, alloc: u32, report_type: u8) -> Vec<u8> {
    let mut c = rw16(0x9e, lba, alloc, 0x12);
    c[14] = report_type;
    c
}

#[test]
fn get_lba_status_reports_every_block_mapped() {
    let l = lun(512);
    let m = Mem::new(1 << 20);
    let x = |c: Vec<u8>| execute(&l, &c, &[], 4096, &m);
    for rt in [0, 2] {
        let d = x(get_lba_status(0, 4096, rt)).data_in;
        assert_eq!(d.len(), 24);
        assert_eq!(u32::from_be_bytes(d[0..4].try_into().unwrap()), 20);
        assert_eq!(d[7] & 1, 1, "RTP");
        assert_eq!(u64::from_be_bytes(d[8..16].try_into().unwrap()), 0);
        assert_eq!(
            u32::from_be_bytes(d[16..20].try_into().unwrap()),
            BLOCKS as u32
        );
        assert_eq!(d[20] & 0x0f, 0, "mapped");
    }
    let d = x(get_lba_status(BLOCKS - 1, 4096, 0)).data_in;
    assert_eq!(u64::from_be_bytes(d[8..16].try_into().unwrap()), BLOCKS - 1);
    assert_eq!(u32::from_be_bytes(d[16..20].try_into().unwrap()), 1);
    // Only deallocated / anchored / not-mapped asked for: none.
    for rt in [1, 3, 4] {
        assert_eq!(
            x(get_lba_status(0, 4096, rt)).data_in,
            vec![0, 0, 0, 4, 0, 0, 0, 1]
        );
    }
    assert_eq!(
        sense_of(&x(get_lba_status(0, 4096, 0x10))),
        (key::ILLEGAL_REQUEST, 0x24, 0),
        "report type 10h (unrecovered errors) is not implemented"
    );
    assert_eq!(
        sense_of(&x(get_lba_status(BLOCKS, 4096, 0))),
        (key::ILLEGAL_REQUEST, 0x21, 0)
    );
    assert_eq!(
        x(get_lba_status(0, 8, 0)).data_in.len(),
        8,
        "allocation length"
    );
    // More than 2^32 blocks: several descriptors, each at most 0xffffffff blocks.
    let huge = LunState::new(LunConfig::new("huge", 512, (1 << 33) + 5));
    let d = execute(&huge, &get_lba_status(1, 4096, 0), &[], 4096, &m).data_in;
    assert_eq!(d.len(), 8 + 3 * 16);
    let descs: Vec<(u64, u32)> = d[8..]
        .chunks(16)
        .map(|c| {
            (
                u64::from_be_bytes(c[0..8].try_into().unwrap()),
                u32::from_be_bytes(c[8..12].try_into().unwrap()),
            )
        })
        .collect();
    assert_eq!(
        descs,
        vec![
            (1, u32::MAX),
            (1 + u32::MAX as u64, u32::MAX),
            (1 + 2 * u32::MAX as u64, 6)
        ]
    );
    // Descriptors are built only as far as the Data-In buffer reaches.
    let d = execute(&huge, &get_lba_status(1, 4096, 0), &[], 24, &m).data_in;
    assert_eq!(d.len(), 24);
    assert_eq!(u32::from_be_bytes(d[0..4].try_into().unwrap()), 20);
}

#[test]
fn write_and_verify_reads_back_what_it_wrote() {
    let l = lun(512);
    let m = Mem::new((BLOCKS * 512) as usize);
    let data = pattern(3 * 512, 5);
    let mut w12 = read12(20, 3);
    w12[0] = 0xae;
    for (cdb, lba) in [
        (rw10(0x2e, 10, 3, 0x02), 10usize),
        (w12.clone(), 20),
        (rw16(0x8e, 30, 3, 0x02), 30),
        (rw10(0x2e, 40, 3, 0x10), 40), // BYTCHK 0, DPO
    ] {
        assert_eq!(execute(&l, &cdb, &data, 0, &m).status, GOOD, "{cdb:02x?}");
        assert_eq!(&m.data.lock().unwrap()[lba * 512..][..3 * 512], &data[..]);
    }
    assert_eq!(*m.fua_writes.lock().unwrap(), 4, "written to the medium");
    // A medium that stores byte 1000 of LBA 60's write wrongly: MISCOMPARE at offset
    // 1000 - 512 of the Data-Out with BYTCHK 1; BYTCHK 0 does not compare.
    let bad = Mem {
        corrupt_at: Some(61 * 512 + 488),
        ..Mem::new((BLOCKS * 512) as usize)
    };
    let r = execute(&l, &rw10(0x2e, 60, 3, 0x02), &data, 0, &bad);
    assert_eq!(sense_of(&r), (key::MISCOMPARE, 0x1d, 0));
    assert_eq!(info(&r), 512 + 488);
    assert_eq!(
        execute(&l, &rw10(0x2e, 60, 3, 0), &data, 0, &bad).status,
        GOOD
    );
    // Read-back failures are MEDIUM ERROR at the failing block.
    let failing = Mem::failing((BLOCKS * 512) as usize, 100 * 512);
    let r = execute(&l, &rw10(0x2e, 99, 3, 0), &data, 0, &failing);
    assert_eq!(
        sense_of(&r),
        (key::MEDIUM_ERROR, 0x0c, 0),
        "the write fails first"
    );
    assert_eq!(info(&r), 100);
    assert_eq!(
        sense_of(&execute(&l, &rw10(0x2e, 0, 3, 0x04), &data, 0, &m)),
        (key::ILLEGAL_REQUEST, 0x24, 0),
        "BYTCHK 10b is reserved"
    );
    assert_eq!(
        sense_of(&execute(&l, &rw10(0x2e, 0, 2, 0x02), &data, 0, &m)),
        (key::ILLEGAL_REQUEST, 0x0e, 0x03)
    );
    assert_eq!(
        sense_of(&execute(
            &l,
            &rw10(0x2e, BLOCKS as u32 - 1, 3, 0),
            &data,
            0,
            &m
        )),
        (key::ILLEGAL_REQUEST, 0x21, 0)
    );
}

#[test]
fn verify_byte_check_modes_and_medium_errors() {
    let l = lun(512);
    let m = Mem::new((BLOCKS * 512) as usize);
    let block = pattern(512, 8);
    let three = [&block[..], &block[..], &block[..]].concat();
    assert_eq!(
        execute(&l, &rw10(0x2a, 50, 3, 0), &three, 0, &m).status,
        GOOD
    );
    // BYTCHK 11b: one Data-Out block compared with every block of the range.
    assert_eq!(
        execute(&l, &rw10(0x2f, 50, 3, 0x06), &block, 0, &m).status,
        GOOD
    );
    m.data.lock().unwrap()[52 * 512 + 9] ^= 0x40;
    let r = execute(&l, &rw16(0x8f, 50, 3, 0x06), &block, 0, &m);
    assert_eq!(sense_of(&r), (key::MISCOMPARE, 0x1d, 0));
    assert_eq!(info(&r), 2 * 512 + 9, "offset within the verified range");
    // BYTCHK 01b with DPO: offset within the Data-Out.
    let r = execute(&l, &rw10(0x2f, 50, 3, 0x12), &three, 0, &m);
    assert_eq!(sense_of(&r), (key::MISCOMPARE, 0x1d, 0));
    assert_eq!(info(&r), 2 * 512 + 9);
    // BYTCHK 00b reads the medium: an unreadable block is a MEDIUM ERROR there.
    let failing = Mem::failing((BLOCKS * 512) as usize, 1500 * 512 + 1);
    assert_eq!(
        execute(&l, &rw10(0x2f, 1000, 400, 0x10), &[], 0, &failing).status,
        GOOD
    );
    let r = execute(&l, &rw16(0x8f, 1000, 1000, 0), &[], 0, &failing);
    assert_eq!(sense_of(&r), (key::MEDIUM_ERROR, 0x11, 0));
    assert_eq!(info(&r), 1500);
    assert_eq!(
        sense_of(&execute(&l, &rw10(0x2f, 50, 3, 0x04), &block, 0, &m)),
        (key::ILLEGAL_REQUEST, 0x24, 0),
        "BYTCHK 10b is reserved"
    );
    assert_eq!(
        sense_of(&execute(&l, &rw10(0x2f, 50, 3, 0x06), &three, 0, &m)),
        (key::ILLEGAL_REQUEST, 0x0e, 0x03),
        "BYTCHK 11b takes one block"
    );
    assert_eq!(
        sense_of(&execute(&l, &rw10(0x2f, 50, 3, 0x02), &block, 0, &m)),
        (key::ILLEGAL_REQUEST, 0x0e, 0x03)
    );
    assert_eq!(
        execute(&l, &rw10(0x2f, 50, 0, 0x02), &[], 0, &m).status,
        GOOD
    );
}

fn cscd(id: [u8; 16], bs: u32) -> [u8; 32] {
    let mut d = [0u8; 32];
    d[0] = 0xe4;
    d[4] = 0x01; // binary
    d[5] = 0x03; // LU, NAA
    d[7] = 16;
    d[8..24].copy_from_slice(&id);
    d[29..32].copy_from_slice(&bs.to_be_bytes()[1..]);
    d
}

fn segment(src: u16, dst: u16, blocks: u16, src_lba: u64, dst_lba: u64) -> [u8; 28] {
    let mut d = [0u8; 28];
    d[0] = 0x02;
    d[2..4].copy_from_slice(&0x18u16.to_be_bytes());
    d[4..6].copy_from_slice(&src.to_be_bytes());
    d[6..8].copy_from_slice(&dst.to_be_bytes());
    d[10..12].copy_from_slice(&blocks.to_be_bytes());
    d[12..20].copy_from_slice(&src_lba.to_be_bytes());
    d[20..28].copy_from_slice(&dst_lba.to_be_bytes());
    d
}

fn copy_list(cscds: &[[u8; 32]], segs: &[[u8; 28]]) -> Vec<u8> {
    let mut d = vec![0u8; 16];
    d[1] = 0x18; // LIST ID USAGE 11b: no list identifier
    d[2..4].copy_from_slice(&((cscds.len() * 32) as u16).to_be_bytes());
    d[8..12].copy_from_slice(&((segs.len() * 28) as u32).to_be_bytes());
    for c in cscds {
        d.extend_from_slice(c);
    }
    for g in segs {
        d.extend_from_slice(g);
    }
    d
}

fn xcopy_cdb(len: usize) -> Vec<u8> {
    let mut c = vec![0u8; 16];
    c[0] = 0x83;
    c[10..14].copy_from_slice(&(len as u32).to_be_bytes());
    c
}

#[test]
fn extended_copy_within_one_lun_including_overlapping_ranges() {
    let l = LunState::new(LunConfig::new("xcopy-one", 512, BLOCKS));
    let m = Mem::new((BLOCKS * 512) as usize);
    let data = pattern(20 * 512, 4);
    assert_eq!(
        execute(&l, &rw10(0x2a, 100, 20, 0), &data, 0, &m).status,
        GOOD
    );
    let me = cscd(naa(&l.cfg), 512);
    let list = copy_list(&[me], &[segment(0, 0, 20, 100, 500)]);
    assert!(
        try_execute(&l, &xcopy_cdb(list.len()), &list, 0, &m).is_none(),
        "never inline"
    );
    assert!(needs_backend(&xcopy_cdb(list.len())));
    let r = execute(&l, &xcopy_cdb(list.len()), &list, 0, &m);
    assert_eq!(r.status, GOOD, "{r:?}");
    assert!(m.data.lock().unwrap()[500 * 512..520 * 512] == data[..]);
    // Overlapping, destination after the source (copied backwards), then before it.
    let list = copy_list(&[me], &[segment(0, 0, 20, 500, 503)]);
    assert_eq!(
        execute(&l, &xcopy_cdb(list.len()), &list, 0, &m).status,
        GOOD
    );
    assert!(m.data.lock().unwrap()[503 * 512..523 * 512] == data[..]);
    let list = copy_list(
        &[me],
        &[segment(0, 0, 20, 503, 501), segment(0, 0, 0, 0, 0)],
    );
    assert_eq!(
        execute(&l, &xcopy_cdb(list.len()), &list, 0, &m).status,
        GOOD
    );
    assert!(m.data.lock().unwrap()[501 * 512..521 * 512] == data[..]);
    // A parameter list length of 0 copies nothing.
    assert_eq!(execute(&l, &xcopy_cdb(0), &[], 0, &m).status, GOOD);
}

#[test]
fn extended_copy_between_luns_of_one_process() {
    use std::sync::Arc;
    let la = Arc::new(LunState::new(LunConfig::new("xcopy-a", 512, BLOCKS)));
    let lb = Arc::new(LunState::new(LunConfig::new("xcopy-b", 512, BLOCKS)));
    let ma = Arc::new(Mem::new((BLOCKS * 512) as usize));
    let mb = Arc::new(Mem::new((BLOCKS * 512) as usize));
    let (ba, bb): (Arc<dyn BlockBackend>, Arc<dyn BlockBackend>) = (ma.clone(), mb.clone());
    let (ca, cb) = (cscd(naa(&la.cfg), 512), cscd(naa(&lb.cfg), 512));
    let data = pattern(8 * 512, 6);
    assert_eq!(
        execute(&la, &rw10(0x2a, 10, 8, 0), &data, 0, &*ma).status,
        GOOD
    );
    // Not registered yet: COPY ABORTED / COPY TARGET DEVICE NOT REACHABLE.
    let list = copy_list(&[ca, cb], &[segment(0, 1, 8, 10, 30)]);
    let r = execute(&la, &xcopy_cdb(list.len()), &list, 0, &*ma);
    assert_eq!(sense_of(&r), (key::COPY_ABORTED, 0x0d, 0x02));
    xcopy::register(&la, &ba);
    xcopy::register(&lb, &bb);
    let r = execute(&la, &xcopy_cdb(list.len()), &list, 0, &*ma);
    assert_eq!(r.status, GOOD, "{r:?}");
    assert!(mb.data.lock().unwrap()[30 * 512..38 * 512] == data[..]);
    // Received by A, copying B to B, and B back to A.
    let list = copy_list(
        &[cb, ca],
        &[segment(0, 0, 8, 30, 60), segment(0, 1, 8, 60, 90)],
    );
    assert_eq!(
        execute(&la, &xcopy_cdb(list.len()), &list, 0, &*ma).status,
        GOOD
    );
    assert!(ma.data.lock().unwrap()[90 * 512..98 * 512] == data[..]);
    // A LUN that went away is no longer reachable.
    drop((lb, bb));
    drop(mb);
    let list = copy_list(&[ca, cb], &[segment(0, 1, 1, 10, 30)]);
    let r = execute(&la, &xcopy_cdb(list.len()), &list, 0, &*ma);
    assert_eq!(sense_of(&r), (key::COPY_ABORTED, 0x0d, 0x02));
}

#[test]
fn extended_copy_refuses_bad_parameter_lists_before_copying() {
    let l = LunState::new(LunConfig::new("xcopy-bad", 512, BLOCKS));
    let m = Mem::new((BLOCKS * 512) as usize);
    let me = cscd(naa(&l.cfg), 512);
    let seg = segment(0, 0, 4, 0, 100);
    let x = |list: &[u8]| execute(&l, &xcopy_cdb(list.len()), list, 0, &m);
    let mut bad = me;
    bad[0] = 0xe5;
    assert_eq!(
        sense_of(&x(&copy_list(&[bad], &[seg]))),
        (key::ILLEGAL_REQUEST, 0x26, 0x07)
    );
    let mut bad = seg;
    bad[0] = 0x01;
    assert_eq!(
        sense_of(&x(&copy_list(&[me], &[bad]))),
        (key::ILLEGAL_REQUEST, 0x26, 0x09)
    );
    assert_eq!(
        sense_of(&x(&copy_list(&[me; 9], &[seg]))),
        (key::ILLEGAL_REQUEST, 0x26, 0x06),
        "too many CSCD descriptors"
    );
    assert_eq!(
        sense_of(&x(&copy_list(&[me], &[seg; 65]))),
        (key::ILLEGAL_REQUEST, 0x26, 0x08),
        "too many segment descriptors"
    );
    assert_eq!(
        sense_of(&x(&copy_list(&[cscd(naa(&l.cfg), 4096)], &[seg]))),
        (key::ILLEGAL_REQUEST, 0x26, 0),
        "disk block length differs from the LUN's"
    );
    assert_eq!(
        sense_of(&x(&copy_list(&[me], &[segment(0, 1, 4, 0, 100)]))),
        (key::ILLEGAL_REQUEST, 0x26, 0),
        "CSCD index out of the list"
    );
    assert_eq!(
        sense_of(&x(&copy_list(
            &[me],
            &[seg, segment(0, 0, 4, BLOCKS - 2, 0)]
        ))),
        (key::ILLEGAL_REQUEST, 0x21, 0)
    );
    let mut inline = copy_list(&[me], &[seg]);
    inline[15] = 4;
    inline.extend_from_slice(&[0; 4]);
    assert_eq!(
        sense_of(&x(&inline)),
        (key::ILLEGAL_REQUEST, 0x26, 0),
        "inline data"
    );
    let list = copy_list(&[me], &[seg]);
    assert_eq!(
        sense_of(&x(&list[..list.len() - 3])),
        (key::ILLEGAL_REQUEST, 0x1a, 0),
        "descriptor lengths beyond the list"
    );
    assert_eq!(
        sense_of(&execute(&l, &xcopy_cdb(list.len()), &list[..20], 0, &m)),
        (key::ILLEGAL_REQUEST, 0x0e, 0x03)
    );
    let mut lid4 = xcopy_cdb(list.len());
    lid4[1] = 0x01;
    assert_eq!(
        sense_of(&execute(&l, &lid4, &list, 0, &m)),
        (key::ILLEGAL_REQUEST, 0x24, 0)
    );
    assert!(
        m.data.lock().unwrap().iter().all(|&b| b == 0),
        "nothing was copied"
    );
}

#[test]
fn copy_manager_is_advertised_and_its_limits_reported() {
    let l = lun(512);
    let m = Mem::new(1 << 20);
    let std = execute(&l, &[0x12, 0, 0, 0, 96, 0], &[], 96, &m).data_in;
    assert_eq!(std[5] & 0x08, 0x08, "3PC");
    let pages = execute(&l, &[0x12, 1, 0, 0, 255, 0], &[], 255, &m).data_in;
    assert!(pages[4..].contains(&0x8f));
    let p = execute(&l, &[0x12, 1, 0x8f, 1, 0, 0], &[], 256, &m).data_in;
    assert_eq!(p[1], 0x8f);
    let len = u16::from_be_bytes([p[2], p[3]]) as usize;
    assert_eq!(p.len(), 4 + len);
    let mut kinds = Vec::new();
    let mut off = 4;
    while off < p.len() {
        let dl = u16::from_be_bytes([p[off + 2], p[off + 3]]) as usize;
        assert_eq!(dl % 4, 0, "descriptor lengths are multiples of 4");
        kinds.push(u16::from_be_bytes([p[off], p[off + 1]]));
        off += 4 + dl;
    }
    assert_eq!(off, p.len());
    assert_eq!(kinds, vec![0x0001, 0x0004, 0x0008, 0x000c, 0x8001]);
    assert_eq!(
        &p[8..15],
        &[6, 0x83, 1, 0, 0x84, 1, 3],
        "supported commands"
    );
    let mut rcr = vec![0u8; 16];
    rcr[0] = 0x84;
    rcr[1] = 0x03;
    rcr[10..14].copy_from_slice(&64u32.to_be_bytes());
    let d = execute(&l, &rcr, &[], 64, &m).data_in;
    assert_eq!(d.len(), 46);
    assert_eq!(u32::from_be_bytes(d[0..4].try_into().unwrap()), 42);
    assert_eq!(
        u16::from_be_bytes([d[8], d[9]]),
        xcopy::MAX_CSCD_DESCRIPTORS
    );
    assert_eq!(
        u16::from_be_bytes([d[10], d[11]]),
        xcopy::MAX_SEGMENT_DESCRIPTORS
    );
    assert_eq!((d[37], d[43], d[44], d[45]), (9, 2, 0x02, 0xe4));
    rcr[1] = 0x00; // COPY STATUS: copies finish before EXTENDED COPY completes
    assert_eq!(
        sense_of(&execute(&l, &rcr, &[], 64, &m)),
        (key::ILLEGAL_REQUEST, 0x24, 0)
    );
}
