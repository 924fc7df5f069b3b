//! The ring against the kernel-side emulator: round trips, wrap-around with PAD,
//! TMR entries, out-of-order completion, Data-Out/Data-In through many iovecs, and
//! malformed entries that must be refused without touching memory outside the map.

use lc::emulator::*;
use lc::ring::{Doorbell, EntryFault, Fetched, Response, Ring, RingError};
use rand::{Rng, SeedableRng};

fn good() -> Response {
    Response {
        status: 0,
        sense: vec![],
        read_len: None,
    }
}

fn ring_for(emu: &Emulator) -> Ring {
    Ring::new(emu.handler_map()).unwrap()
}

#[test]
fn commands_round_trip_with_data_in_both_directions() {
    let mut emu = Emulator::small(FLAG_OOOC | FLAG_READ_LEN);
    let mut ring = ring_for(&emu);
    let bell = emu.doorbell();
    let data: Vec<u8> = (0..3 * 4096 + 512).map(|i| (i % 251) as u8).collect();
    let w = emu
        .submit(&[0x2a, 0, 0, 0, 0, 0, 0, 0, 27, 0], &data, 0)
        .unwrap();
    let r = emu
        .submit(&[0x28, 0, 0, 0, 0, 0, 0, 0, 8, 0], &[], 4096)
        .unwrap();
    bell.ack().unwrap();
    let got = ring.fetch().unwrap();
    assert_eq!(got.len(), 2);
    let Fetched::Cmd(wc) = &got[0] else { panic!() };
    assert_eq!((wc.cmd_id, wc.cdb[0], wc.cdb.len()), (w, 0x2a, 10));
    assert_eq!(ring.gather(&wc.iovs).unwrap(), data);
    let Fetched::Cmd(rc) = &got[1] else { panic!() };
    ring.scatter(&rc.iovs, &[7u8; 1000]).unwrap();
    ring.complete(
        rc.cmd_id,
        Response {
            status: 0,
            sense: vec![],
            read_len: Some(1000),
        },
    )
    .unwrap();
    ring.complete(
        wc.cmd_id,
        Response {
            status: 2,
            sense: vec![0x70, 0, 5],
            read_len: None,
        },
    )
    .unwrap();
    assert!(ring.publish().unwrap());
    bell.kick().unwrap();
    let mut done = emu.reap();
    done.sort_by_key(|c| c.cmd_id);
    assert_eq!(done.len(), 2);
    assert_eq!(
        (done[0].cmd_id, done[0].status, &done[0].sense[..3]),
        (w, 2, &[0x70, 0, 5][..])
    );
    assert_eq!(done[1].cmd_id, r);
    assert_eq!(done[1].data_in, vec![7u8; 1000], "READ_LEN honoured");
    assert_eq!(emu.inflight(), 0);
}

#[test]
fn out_of_order_completion_steals_tail_slots_and_in_order_waits() {
    for flags in [FLAG_OOOC, 0] {
        let mut emu = Emulator::small(flags);
        let mut ring = ring_for(&emu);
        let ids: Vec<u16> = (0..10)
            .map(|_| emu.submit(&[0, 0, 0, 0, 0, 0], &[], 0).unwrap())
            .collect();
        assert_eq!(ring.fetch().unwrap().len(), 10);
        // Complete the last one first.
        ring.complete(ids[9], good()).unwrap();
        ring.publish().unwrap();
        let first = emu.reap();
        if flags & FLAG_OOOC != 0 {
            assert_eq!(
                first.iter().map(|c| c.cmd_id).collect::<Vec<_>>(),
                vec![ids[9]]
            );
        } else {
            assert!(
                first.is_empty(),
                "in-order ring must not pass an uncompleted entry"
            );
        }
        for &id in ids[..9].iter().rev() {
            ring.complete(id, good()).unwrap();
        }
        ring.publish().unwrap();
        let rest = emu.reap();
        assert_eq!(first.len() + rest.len(), 10);
        assert_eq!(emu.inflight(), 0);
        assert!(matches!(
            ring.complete(ids[0], good()),
            Err(RingError::UnknownId(_))
        ));
    }
}

#[test]
fn wrap_around_with_pad_entries_and_tmr_many_times() {
    let seed: u64 = rand::random();
    println!("seed {seed}");
    let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
    let mut emu = Emulator::new(4096 - CMDR_OFF as u32 + 4096, 1 << 20, FLAG_OOOC | FLAG_TMR);
    let mut ring = ring_for(&emu);
    let mut pending: Vec<u16> = Vec::new();
    let mut completed = 0;
    for _ in 0..5000 {
        if rng.gen_bool(0.6) {
            let n = rng.gen_range(0..3) * 4096 + rng.gen_range(1..4096);
            let data = vec![rng.gen::<u8>(); n];
            let cdb: &[u8] = if rng.gen_bool(0.5) {
                &[0x8a; 16]
            } else {
                &[0x2a; 10]
            };
            if emu.submit(cdb, &data, 0).is_some() {
                for f in ring.fetch().unwrap() {
                    match f {
                        Fetched::Cmd(c) => {
                            assert_eq!(ring.gather(&c.iovs).unwrap(), data);
                            pending.push(c.cmd_id);
                        }
                        Fetched::Tmr(_) => {}
                        Fetched::Malformed(m) => panic!("seed {seed}: {m:?}"),
                    }
                }
            }
        }
        if rng.gen_bool(0.05) && !pending.is_empty() && emu.submit_tmr(1, &pending[..1]) {
            let f = ring.fetch().unwrap();
            assert!(matches!(&f[..], [Fetched::Tmr(t)] if t.cmd_ids == pending[..1]));
        }
        if !pending.is_empty() && rng.gen_bool(0.5) {
            let id = pending.swap_remove(rng.gen_range(0..pending.len()));
            ring.complete(id, good()).unwrap();
            ring.publish().unwrap();
            completed += emu.reap().len();
        }
    }
    for id in pending.drain(..) {
        ring.complete(id, good()).unwrap();
    }
    ring.publish().unwrap();
    completed += emu.reap().len();
    assert_eq!(emu.inflight(), 0, "seed {seed}");
    assert!(
        completed > 1000,
        "seed {seed}: only {completed} commands went round"
    );
}

fn raw_cmd(len: u32, cdb_off: u64, iovs: &[(u64, u64)]) -> Vec<u8> {
    let mut e = vec![0u8; len as usize];
    e[0..4].copy_from_slice(&(len | 1).to_ne_bytes());
    e[4..6].copy_from_slice(&7u16.to_ne_bytes());
    e[8..12].copy_from_slice(&(iovs.len() as u32).to_ne_bytes());
    e[24..32].copy_from_slice(&cdb_off.to_ne_bytes());
    for (i, (o, l)) in iovs.iter().enumerate() {
        let p = 48 + 16 * i;
        if p + 16 <= e.len() {
            e[p..p + 8].copy_from_slice(&o.to_ne_bytes());
            e[p + 8..p + 16].copy_from_slice(&l.to_ne_bytes());
        }
    }
    e
}

#[test]
fn malformed_entries_get_an_error_completion_and_the_ring_goes_on() {
    // Each case: a fresh device whose first entry is bad but framed (its length is
    // right), so the ring stays usable.
    let entry_at = CMDR_OFF;
    let data_off = (64 << 10) as u64;
    type Case = (&'static str, Vec<u8>, fn(&EntryFault) -> bool);
    let cases: Vec<Case> = vec![
        (
            "iovec outside the map",
            raw_cmd(128, entry_at + 112, &[(1 << 40, 4096)]),
            |f| matches!(f, EntryFault::IovecOutside { .. }),
        ),
        (
            "iovec in the ring, not the data area",
            raw_cmd(128, entry_at + 112, &[(CMDR_OFF, 64)]),
            |f| matches!(f, EntryFault::IovecOutside { .. }),
        ),
        (
            "iovec length overflow",
            raw_cmd(128, entry_at + 112, &[(data_off, u64::MAX)]),
            |f| matches!(f, EntryFault::IovecOutside { .. }),
        ),
        (
            "overlapping iovecs (each the whole data area)",
            raw_cmd(
                176,
                entry_at + 160,
                &[
                    (data_off, 4 << 20),
                    (data_off, 4 << 20),
                    (data_off, 4 << 20),
                ],
            ),
            |f| matches!(f, EntryFault::IovecOverlap { .. }),
        ),
        (
            "partly overlapping iovecs, out of order",
            raw_cmd(
                176,
                entry_at + 160,
                &[
                    (data_off + 8192, 4096),
                    (data_off, 4096),
                    (data_off + 4095, 2),
                ],
            ),
            |f| matches!(f, EntryFault::IovecOverlap { .. }),
        ),
        (
            "cdb_off outside the entry",
            raw_cmd(128, 1 << 30, &[]),
            |f| matches!(f, EntryFault::CdbOutside(_)),
        ),
        (
            "cdb_off inside the iovec array",
            raw_cmd(128, entry_at + 8, &[]),
            |f| matches!(f, EntryFault::CdbOutside(_)),
        ),
        (
            "absurd iov_cnt",
            {
                let mut e = raw_cmd(128, entry_at + 112, &[]);
                e[8..12].copy_from_slice(&u32::MAX.to_ne_bytes());
                e[12..16].copy_from_slice(&u32::MAX.to_ne_bytes());
                e
            },
            |f| matches!(f, EntryFault::TooManyIovecs { .. }),
        ),
        (
            "CDB longer than the entry",
            {
                let mut e = raw_cmd(120, entry_at + 112, &[]);
                e[112] = 0x88; // 16-byte CDB, 8 bytes available
                e
            },
            |f| matches!(f, EntryFault::CdbTooLong { .. }),
        ),
    ];
    for (what, mut entry, expect) in cases {
        let mut emu = Emulator::small(FLAG_OOOC);
        let mut ring = ring_for(&emu);
        if entry[112..].iter().all(|&b| b == 0) && entry.len() > 112 {
            entry[112] = 0x2a; // a WRITE(10) CDB where the entry has room
        }
        let id = emu.submit_raw_cmd(&entry);
        let got = ring.fetch().unwrap_or_else(|e| panic!("{what}: {e}"));
        let [Fetched::Malformed(m)] = &got[..] else {
            panic!("{what}: accepted as {got:?}")
        };
        assert_eq!(m.cmd_id, Some(id), "{what}");
        assert!(expect(&m.fault), "{what}: {:?}", m.fault);
        ring.complete(
            id,
            Response {
                status: 2,
                sense: vec![0x70, 0, 4],
                read_len: None,
            },
        )
        .unwrap();
        // The next command on the same ring goes through.
        let next = emu
            .submit(&[0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0], &[], 512)
            .unwrap();
        let got = ring.fetch().unwrap();
        assert!(
            matches!(&got[..], [Fetched::Cmd(c)] if c.cmd_id == next),
            "{what}"
        );
        ring.complete(next, good()).unwrap();
        ring.publish().unwrap();
        let done = emu.reap();
        assert_eq!(
            done.iter()
                .map(|c| (c.cmd_id, c.status))
                .collect::<Vec<_>>(),
            vec![(id, 2), (next, 0)],
            "{what}"
        );
    }
    // A TMR listing more ids than it holds is skipped (nothing to complete).
    let mut emu = Emulator::small(FLAG_OOOC | FLAG_TMR);
    let mut ring = ring_for(&emu);
    let mut e = vec![0u8; 40];
    e[0..4].copy_from_slice(&(40u32 | 2).to_ne_bytes());
    e[12..16].copy_from_slice(&100u32.to_ne_bytes());
    emu.submit_raw(&e);
    let got = ring.fetch().unwrap();
    assert!(matches!(
        &got[..],
        [Fetched::Malformed(m)] if m.cmd_id.is_none() && matches!(m.fault, EntryFault::TmrIds { .. })
    ));
}

#[test]
fn entries_that_lose_the_framing_are_ring_errors() {
    let entry_at = CMDR_OFF;
    // A length running past the head.
    let mut emu = Emulator::small(0);
    let mut ring = ring_for(&emu);
    let mut e = raw_cmd(128, entry_at + 112, &[]);
    e[0..4].copy_from_slice(&(4096u32 | 1).to_ne_bytes());
    emu.submit_raw(&e);
    assert!(matches!(
        ring.fetch(),
        Err(RingError::Entry {
            fault: EntryFault::Length { len: 4096, .. },
            ..
        })
    ));
    // A zero length.
    let mut emu = Emulator::small(0);
    let mut ring = ring_for(&emu);
    let mut e = raw_cmd(128, entry_at + 112, &[]);
    e[0..4].copy_from_slice(&1u32.to_ne_bytes());
    emu.submit_raw(&e);
    assert!(matches!(
        ring.fetch(),
        Err(RingError::Entry {
            fault: EntryFault::Length { len: 0, .. },
            ..
        })
    ));
    // The same id twice while the first is outstanding.
    let mut emu = Emulator::small(FLAG_OOOC);
    let mut ring = ring_for(&emu);
    let mut e = raw_cmd(128, entry_at + 112, &[]);
    e[112] = 0;
    emu.submit_raw(&e);
    emu.submit_raw(&e);
    assert!(matches!(
        ring.fetch(),
        Err(RingError::Entry {
            fault: EntryFault::DuplicateId(7),
            ..
        })
    ));
    // Bad mailbox version.
    let emu = Emulator::small(0);
    emu.map.write_u16(0, 1).unwrap();
    assert!(matches!(
        Ring::new(emu.handler_map()),
        Err(RingError::Mailbox(_))
    ));
}

#[test]
fn a_reset_ring_is_served_again_from_offset_zero() {
    let mut emu = Emulator::small(FLAG_OOOC);
    let mut ring = ring_for(&emu);
    let bell = emu.doorbell();
    // Move the ring off zero first.
    for _ in 0..3 {
        let id = emu.submit(&[0, 0, 0, 0, 0, 0], &[], 0).unwrap();
        ring.fetch().unwrap();
        ring.complete(id, good()).unwrap();
        ring.publish().unwrap();
        assert_eq!(emu.reap().len(), 1);
    }
    let stuck = emu.submit(&[0, 0, 0, 0, 0, 0], &[], 0).unwrap();
    let mut e = raw_cmd(128, CMDR_OFF + 112, &[]);
    e[0..4].copy_from_slice(&(8192u32 | 1).to_ne_bytes());
    emu.submit_raw(&e);
    assert!(ring.fetch().is_err());
    assert!(bell.reset_ring().unwrap());
    ring.restart().unwrap();
    let done = emu.reap();
    assert_eq!(
        done.iter()
            .map(|c| (c.cmd_id, c.status))
            .collect::<Vec<_>>(),
        vec![(stuck, BUSY)],
        "the reset completes what was outstanding with BUSY"
    );
    let id = emu.submit(&[0, 0, 0, 0, 0, 0], &[], 0).unwrap();
    let got = ring.fetch().unwrap();
    assert!(matches!(&got[..], [Fetched::Cmd(c)] if c.cmd_id == id));
    ring.complete(id, good()).unwrap();
    ring.publish().unwrap();
    assert_eq!(emu.reap()[0].cmd_id, id);
}

#[test]
fn random_entries_never_crash_the_parser() {
    let seed: u64 = rand::random();
    println!("seed {seed}");
    let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
    for _ in 0..3000 {
        let mut emu = Emulator::small(FLAG_OOOC);
        let mut ring = ring_for(&emu);
        let len = rng.gen_range(1..64u32) * 8;
        let n = len as usize;
        let mut e: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
        if rng.gen_bool(0.7) {
            // Mostly plausible headers so the deeper checks run.
            let op = rng.gen_range(0..4u32);
            e[0..4].copy_from_slice(&(len | op).to_ne_bytes());
            if rng.gen_bool(0.5) && n >= 32 {
                let cdb_off = CMDR_OFF + rng.gen_range(0..len as u64 + 64);
                e[24..32].copy_from_slice(&cdb_off.to_ne_bytes());
            }
        }
        emu.submit_raw(&e);
        let _ = ring.fetch();
        let _ = ring.publish();
    }
}
