//! The bodies of lc's fuzz targets, one function per decoder of untrusted bytes (the
//! idea of rust-vmm vm-virtio's `fuzz/common`). The libFuzzer binaries of `fuzz/` call
//! them, and so does `tests/seeds.rs`, which replays every seed under
//! `fuzz/seeds/<target>/` in `cargo test`. Each must return normally on every input: a
//! panic is a bug in the decoder it drives (or in the invariant it checks).

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use lc::api::{self, Done, Progress, Request};
use lc::control::{self, Handler, Limits};
use lc::emulator::Emulator;
use lc::ring::{Fetched, Response, Ring};
use lc::scsi::{execute, BlockBackend, IoError, LunConfig, LunState};
use lc_cache::format::{self, CheckpointHeader, Geometry, SegmentHeader, Superblock};
use serde_json::Value;

/// A target's body.
pub type Body = fn(&[u8]);

/// Every target: its name (the binary `fuzz/fuzz_targets/<name>.rs` and the seed
/// directory `fuzz/seeds/<name>/`) and its body.
pub const TARGETS: &[(&str, Body)] = &[
    ("ring_entry", ring_entry),
    ("ring_ops", ring_ops),
    ("scsi_cdb", scsi_cdb),
    ("superblock", superblock),
    ("segment_header", segment_header),
    ("netlink_event", netlink_event),
    ("control_request", control_request),
    ("config", config),
];

/// Bytes of the command ring the ring target writes (with the 128-byte mailbox, the
/// data area starts on a page).
const RING: u32 = 4096 - 128;

/// Arbitrary bytes as the command ring of a device in heap memory (byte 0: the mailbox
/// flags, byte 1: `cmd_head / 8`, the rest: the ring from its start), fetched by the
/// handler's ring: it must refuse or accept, never read outside the memory or panic;
/// every command it fetched (well-formed or not) completes, and the tail is published.
pub fn ring_entry(data: &[u8]) {
    let (flags, head, ring) = match data {
        [f, h, rest @ ..] => (*f as u16 & 0xf, (*h as u32 * 8) % RING, rest),
        _ => return,
    };
    let mut emu = Emulator::new(RING, 2 * 4096, flags);
    emu.scribble(ring, head);
    let Ok(mut r) = Ring::new(emu.handler_map()) else {
        return;
    };
    let Ok(fetched) = r.fetch() else { return };
    let mut ids = Vec::new();
    for f in fetched {
        match f {
            Fetched::Cmd(c) => {
                if let Ok(lent) = r.lend(&c.iovs) {
                    let _ = lent.gather();
                }
                ids.push(c.cmd_id);
            }
            Fetched::Malformed(m) => ids.extend(m.cmd_id),
            Fetched::Tmr(_) => {}
        }
    }
    // Last first: out of order when the mailbox allows it.
    for id in ids.into_iter().rev() {
        let resp = Response {
            status: 0,
            sense: vec![],
            read_len: Some(1),
        };
        r.complete(id, resp).expect("a fetched command completes");
    }
    r.publish().expect("the tail is published");
    assert_eq!(r.outstanding(), 0);
}

/// A sequence of ring operations, one per input byte (its low 3 bits the operation,
/// the rest its argument), played between the kernel emulator and the handler's ring
/// over heap memory (byte 0: the mailbox flags): commands queued with Data-Out or room
/// for Data-In, fetched, their data checked through the loan, completed in any order,
/// the tail published and reaped, TMRs. The emulator panics on a completion it cannot
/// match (a broken kernel ring); every command completed comes back once with its
/// status and Data-In, and at the end every command queued has come back.
pub fn ring_ops(data: &[u8]) {
    let Some((&flags, ops)) = data.split_first() else {
        return;
    };
    let mut emu = Emulator::new(2 * 4096 - 128, 16 * 4096, flags as u16 & 0x7);
    let mut r = Ring::new(emu.handler_map()).expect("the emulator's mailbox");
    // id -> (Data-Out, Data-In length) of queued commands; fetched commands; completed
    // ones (id -> the status and Data-In given).
    let mut queued: HashMap<u16, (Vec<u8>, usize)> = HashMap::new();
    let mut fetched: Vec<lc::ring::Command> = Vec::new();
    let mut done: HashMap<u16, (u8, Vec<u8>)> = HashMap::new();
    let reap = |emu: &mut Emulator,
                queued: &mut HashMap<u16, (Vec<u8>, usize)>,
                done: &mut HashMap<u16, (u8, Vec<u8>)>| {
        for c in emu.reap() {
            let (status, data_in) = done.remove(&c.cmd_id).expect("reaped once, completed");
            assert_eq!(c.status, status, "status of {}", c.cmd_id);
            assert_eq!(c.data_in, data_in, "Data-In of {}", c.cmd_id);
            queued.remove(&c.cmd_id);
        }
    };
    let complete = |r: &mut Ring, c: lc::ring::Command, arg: u8, done: &mut HashMap<_, _>| {
        let (_, in_len) = queued_len(&c);
        let data_in: Vec<u8> = (0..in_len).map(|i| (i as u8) ^ arg).collect();
        if in_len > 0 {
            r.scatter(&c.iovs, &data_in).expect("Data-In into the loan");
        }
        let status = if arg & 1 == 0 { 0 } else { 2 };
        let resp = Response {
            status,
            sense: vec![arg; (arg % 4) as usize],
            read_len: None,
        };
        r.complete(c.cmd_id, resp)
            .expect("a fetched command completes");
        done.insert(c.cmd_id, (status, data_in));
    };
    for (i, &b) in ops.iter().enumerate() {
        let arg = b >> 3;
        match b & 7 {
            // WRITE(10) or READ(10) of 1-4 blocks of 512 bytes.
            op @ (0 | 1) => {
                let blocks = 1 + (arg % 4) as usize;
                let (out, in_len) = if op == 0 {
                    (vec![i as u8; blocks * 512], 0)
                } else {
                    (Vec::new(), blocks * 512)
                };
                let opcode = if op == 0 { 0x2a } else { 0x28 };
                let cdb = [opcode, 0, 0, 0, 0, 0, 0, 0, blocks as u8, 0];
                if let Some(id) = emu.submit(&cdb, &out, in_len) {
                    queued.insert(id, (out, in_len));
                }
            }
            2 => {
                for f in r.fetch().expect("the emulator's entries are sound") {
                    match f {
                        Fetched::Cmd(c) => {
                            let (out, _) = &queued[&c.cmd_id];
                            if !out.is_empty() {
                                let got = r.gather(&c.iovs).expect("the Data-Out loan");
                                assert_eq!(&got, out, "Data-Out of {}", c.cmd_id);
                            }
                            fetched.push(c);
                        }
                        Fetched::Tmr(_) => {}
                        Fetched::Malformed(m) => panic!("emulator entry refused: {m:?}"),
                    }
                }
            }
            3 if !fetched.is_empty() => {
                let c = fetched.remove(arg as usize % fetched.len());
                complete(&mut r, c, arg, &mut done);
            }
            4 if r.publish().expect("publish") => reap(&mut emu, &mut queued, &mut done),
            5 => {
                let ids: Vec<u16> = queued.keys().copied().take(arg as usize % 4).collect();
                emu.submit_tmr(arg, &ids);
            }
            _ => {}
        }
    }
    // Drain: fetch and complete everything, publish, reap.
    loop {
        for f in r.fetch().expect("fetch") {
            if let Fetched::Cmd(c) = f {
                fetched.push(c);
            }
        }
        if fetched.is_empty() {
            break;
        }
        for c in std::mem::take(&mut fetched) {
            complete(&mut r, c, 0, &mut done);
        }
    }
    r.publish().expect("publish");
    reap(&mut emu, &mut queued, &mut done);
    assert!(
        done.is_empty(),
        "completed, never reaped: {:?}",
        done.keys()
    );
    assert!(
        queued.is_empty(),
        "queued, never completed: {:?}",
        queued.keys()
    );
    assert_eq!(emu.inflight(), 0);
}

/// Data-Out and Data-In lengths of a fetched READ(10)/WRITE(10) of `ring_ops`.
fn queued_len(c: &lc::ring::Command) -> (usize, usize) {
    let bytes = c.cdb.get(8).copied().unwrap_or(0) as usize * 512;
    if c.cdb.first() == Some(&0x28) {
        (0, bytes)
    } else {
        (bytes, 0)
    }
}

/// An in-memory disk for the SCSI target.
struct Mem(Mutex<Vec<u8>>);

impl BlockBackend for Mem {
    fn read(&self, o: u64, bufs: &mut [&mut [u8]]) -> Result<(), IoError> {
        let d = self.0.lock().unwrap();
        let mut at = o as usize;
        for b in bufs.iter_mut() {
            b.copy_from_slice(&d[at..at + b.len()]);
            at += b.len();
        }
        Ok(())
    }
    fn write(&self, o: u64, data: &[&[u8]], _fua: bool) -> Result<(), IoError> {
        let mut d = self.0.lock().unwrap();
        let mut at = o as usize;
        for b in data {
            d[at..at + b.len()].copy_from_slice(b);
            at += b.len();
        }
        Ok(())
    }
    fn flush(&self) -> Result<(), IoError> {
        Ok(())
    }
    fn discard(&self, o: u64, l: u64) -> Result<(), IoError> {
        self.0.lock().unwrap()[o as usize..(o + l) as usize].fill(0);
        Ok(())
    }
}

/// Arbitrary CDB + Data-Out (byte 0: the CDB length mod 32) through the SCSI emulation
/// over an in-memory disk: every response is GOOD or CHECK CONDITION with sense.
pub fn scsi_cdb(data: &[u8]) {
    if data.len() < 2 {
        return;
    }
    let cdb_len = (data[0] as usize % 32).min(data.len() - 1);
    let (cdb, out) = data[1..].split_at(cdb_len);
    let lun = LunState::new(LunConfig {
        max_unmap_blocks: 256,
        ..LunConfig::new("fuzz", 512, 2048)
    });
    let mem = Mem(Mutex::new(vec![0; 2048 * 512]));
    let r = execute(&lun, cdb, out, 1 << 16, &mem);
    assert!(r.status == 0 || (r.status == 2 && !r.sense.is_empty()));
}

/// `buf` with `magic` at its start and a valid crc32c in its last 4 bytes, so a decoder
/// gets past its checksum to the fields.
fn sealed(buf: &[u8], magic: &[u8; 8]) -> Vec<u8> {
    let mut b = buf.to_vec();
    b[..8].copy_from_slice(magic);
    let end = b.len() - 4;
    let c = format::crc(&b[..end]);
    b[end..].copy_from_slice(&c.to_le_bytes());
    b
}

/// `data` cut or zero-padded to `len` bytes.
fn sized(data: &[u8], len: usize) -> Vec<u8> {
    let mut b = data[..data.len().min(len)].to_vec();
    b.resize(len, 0);
    b
}

/// A superblock copy from arbitrary bytes, as read (checksum and all) and sealed (magic
/// and checksum made right): decoded or refused; what decodes encodes to a copy that
/// decodes to the same geometry and sequence numbers.
pub fn superblock(data: &[u8]) {
    let raw = sized(data, format::SB_COPY_SIZE);
    let _ = Superblock::decode(&raw, "fuzz");
    let Ok(sb) = Superblock::decode(&sealed(&raw, &format::SB_MAGIC), "fuzz") else {
        return;
    };
    let again = Superblock::decode(&sb.encode(), "fuzz").expect("an encoded superblock decodes");
    assert_eq!(
        (again.geometry, again.seq, again.uuid),
        (sb.geometry, sb.seq, sb.uuid)
    );
}

/// A geometry from one byte: format 1 or 2, 512- or 4096-byte blocks, segments of
/// 64 KiB to 4 MiB, on a device of 64 segments.
fn geometry(b: u8) -> Geometry {
    let version = 1 + (b & 1) as u32;
    let block = if b & 2 == 0 { 512 } else { 4096 };
    let segment = (64u32 << 10) << ((b >> 2) % 7);
    Geometry::with_version(version, block, segment, 64 * segment as u64).expect("a geometry")
}

/// Segment-header copies and a checkpoint header from arbitrary bytes (byte 0: the
/// geometry), as read and sealed: decoded or refused; a header that decodes encodes to
/// the same header.
pub fn segment_header(data: &[u8]) {
    let Some((&g, rest)) = data.split_first() else {
        return;
    };
    let g = geometry(g);
    let hl = g.header_len();
    let slot = sized(rest, g.data_start());
    let _ = format::decode_copies(&slot, &g);
    let _ = format::newest_header(&slot, &g, 1, &[0; 16]);
    let sealed_hdr = sealed(&slot[..hl], &format::SEG_MAGIC);
    if let Ok((h, crc)) = SegmentHeader::decode(&sealed_hdr, &g) {
        let mut out = vec![0u8; hl];
        let crc2 = h.encode_into(&mut out);
        let (again, crc3) = SegmentHeader::decode(&out, &g).expect("an encoded header decodes");
        assert_eq!(again, h);
        assert_eq!(crc2, crc3);
        let _ = crc;
    }
    let cp = sized(rest, format::CP_HEADER);
    let uuid: [u8; 16] = cp[16..32].try_into().expect("16 bytes");
    for b in [cp.clone(), sealed(&cp, &format::CP_MAGIC)] {
        for area in 0..2 {
            let _ = CheckpointHeader::decode(&b, &g, &uuid, area);
        }
    }
}

/// Arbitrary bytes as a netlink datagram from the kernel (bytes 0-1: the TCMU family
/// id) and as a genl payload: decoded into events or refused.
pub fn netlink_event(data: &[u8]) {
    let _ = lc::netlink::parse_event(data);
    if let [a, b, rest @ ..] = data {
        let family = u16::from_ne_bytes([*a, *b]);
        let _ = lc::netlink::decode_datagram(rest, lc::netlink::KERNEL_PORT, family);
    }
}

/// Answers every control request with an empty object.
struct Nop;

impl Handler for Nop {
    fn handle(
        &self,
        _req: Request,
        _progress: &mut dyn FnMut(Progress),
    ) -> Result<api::Response, lc::Error> {
        Ok(api::Response::Done(Done::default()))
    }
}

/// Arbitrary bytes sent on a control connection, served by the daemon's connection
/// code (line framing, request decoding) with a handler that accepts everything: every
/// line of the answer is a JSON object with `ok`.
pub fn control_request(data: &[u8]) {
    let (client, server) = UnixStream::pair().expect("a socket pair");
    let limits = Limits {
        max_connections: 1,
        idle_timeout: Duration::from_secs(5),
        write_timeout: Duration::from_secs(5),
    };
    let served = std::thread::spawn(move || control::serve_conn(server, &Nop, limits));
    let mut w = client.try_clone().expect("a second handle");
    let input = data.to_vec();
    let writer = std::thread::spawn(move || {
        let _ = w.write_all(&input);
        let _ = w.shutdown(std::net::Shutdown::Write);
    });
    let mut answer = String::new();
    let mut r = client;
    let _ = r.read_to_string(&mut answer);
    writer.join().expect("the writer");
    served
        .join()
        .expect("the connection is served without a panic");
    for line in answer.lines() {
        let v: Value = serde_json::from_str(line).expect("each answer is JSON");
        assert!(v.get("ok").is_some(), "an answer without ok: {line}");
    }
}

/// Arbitrary bytes as lc.toml: parsed and validated, or refused with an error.
pub fn config(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = lc::config::parse(text, Path::new("fuzz.toml"));
    }
}
