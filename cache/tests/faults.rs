//! I/O errors: a failing backing device surfaces as an error naming the failing offset
//! and the cache keeps serving; a failing cache device stops writes cleanly; dropping a
//! cache without `close` keeps what was flushed.

mod common;

use std::sync::Arc;

use common::*;
use lc_cache::testing::FaultDevice;
use lc_cache::{BlockDevice, Cache, Error, Failure, MemDevice, OpenOptions, Tunables};

const SEG: u32 = 64 << 10;

#[test]
fn backing_read_error_names_the_offset_and_other_devices_keep_working() {
    let cache = mem_cache(SEG as u64 * 8, 512, SEG);
    let bad = Arc::new(FaultDevice::new(Arc::new(MemDevice::new(1 << 20))));
    let good: Arc<dyn BlockDevice> = Arc::new(MemDevice::new(1 << 20));
    let c = open(
        cache,
        &[bad.clone() as Arc<dyn BlockDevice>, good.clone()],
        Tunables::default(),
        2,
    );
    bad.faults.lock().unwrap().bad_read_sectors.insert(100);
    let mut buf = vec![0u8; 8192];
    let e = c.read(0, 96 * 512, &mut buf).unwrap_err();
    assert!(
        matches!(e, Error::Io { offset, .. } if offset == 96 * 512),
        "{e}"
    );
    // Cached data of the failing device is still served; the good device is untouched.
    c.write(0, 100 * 512, &[7u8; 512], false).unwrap();
    let mut one = [0u8; 512];
    c.read(0, 100 * 512, &mut one).unwrap();
    assert_eq!(one, [7u8; 512]);
    c.write(1, 0, &[9u8; 4096], true).unwrap();
    c.read(1, 0, &mut buf[..4096]).unwrap();
    assert!(buf[..4096].iter().all(|&b| b == 9));
    c.close().unwrap();
}

#[test]
fn writeback_retries_a_failing_backing_device_and_loses_nothing() {
    let cache = mem_cache(SEG as u64 * 8, 512, SEG);
    let mem = Arc::new(MemDevice::new(1 << 20));
    let bad = Arc::new(FaultDevice::new(mem.clone()));
    let c = open(
        cache,
        &[bad.clone() as Arc<dyn BlockDevice>],
        Tunables {
            writeback_threshold: 0,
            ..Tunables::default()
        },
        2,
    );
    bad.faults.lock().unwrap().bad_write_sectors.extend(0..2048);
    let data: Vec<u8> = (0..256 * 1024u32).map(|i| (i % 253) as u8).collect();
    c.write(0, 0, &data, false).unwrap();
    c.flush().unwrap();
    std::thread::sleep(std::time::Duration::from_millis(300));
    // Writeback cannot progress, the data is served from the cache meanwhile.
    assert!(c.stats().dirty_lines[0].1 > 0);
    let mut back = vec![0u8; data.len()];
    c.read(0, 0, &mut back).unwrap();
    assert!(back == data);
    bad.faults.lock().unwrap().bad_write_sectors.clear();
    c.drain(0, &mut |_| {}).unwrap();
    c.close().unwrap();
    let mut raw = vec![0u8; data.len()];
    mem.read_at(&mut raw, 0).unwrap();
    assert!(raw == data, "backing device after the fault cleared");
}

#[test]
fn cache_device_failure_fails_flushes_but_keeps_reads_and_never_panics() {
    let mem: Arc<dyn BlockDevice> = mem_cache(SEG as u64 * 8, 512, SEG);
    let faulty = Arc::new(FaultDevice::new(mem));
    let backing: Arc<dyn BlockDevice> = Arc::new(MemDevice::new(1 << 20));
    let (c, _) = Cache::open(faulty.clone(), backings(&[backing]), OpenOptions::default()).unwrap();
    c.write(0, 0, &[5u8; 4096], true).unwrap();
    faulty
        .faults
        .lock()
        .unwrap()
        .bad_write_sectors
        .extend(0..1 << 20);
    c.write(0, 8192, &[6u8; 4096], false).unwrap();
    let e = c.flush().unwrap_err();
    assert!(e.to_string().contains("cache failed"), "{e}");
    // Typed: the cache device's error, with its offset and the io::Error behind it.
    match &e {
        Error::Failed(Failure::Device(d)) => assert!(matches!(**d, Error::Io { .. }), "{d}"),
        _ => panic!("not a cache-device failure: {e:?}"),
    }
    assert!(e.io_error().is_some(), "{e}");
    let mut buf = [0u8; 4096];
    c.read(0, 0, &mut buf).unwrap();
    assert_eq!(buf, [5u8; 4096]);
    assert!(c.write(0, 0, &[1u8; 4096], false).is_err());
    assert!(c.failure().is_some());
    assert!(c.close().is_err());
}

#[test]
fn drop_without_close_keeps_flushed_and_fua_data() {
    let cache = mem_cache(SEG as u64 * 8, 512, SEG);
    let backing: Arc<dyn BlockDevice> = Arc::new(MemDevice::new(1 << 20));
    {
        let c = open(
            cache.clone(),
            std::slice::from_ref(&backing),
            Tunables {
                writeback_enabled: false,
                ..Tunables::default()
            },
            2,
        );
        c.write(0, 0, &[1u8; 8192], false).unwrap();
        c.flush().unwrap();
        c.write(0, 65536, &[2u8; 512], true).unwrap();
    }
    let c = open(cache, &[backing], Tunables::default(), 2);
    let mut buf = vec![0u8; 8192];
    c.read(0, 0, &mut buf).unwrap();
    assert!(buf.iter().all(|&b| b == 1));
    c.read(0, 65536, &mut buf[..512]).unwrap();
    assert!(buf[..512].iter().all(|&b| b == 2));
}

#[test]
fn bad_requests_are_refused_with_reasons() {
    let cache = mem_cache(SEG as u64 * 8, 4096, SEG);
    let backing: Arc<dyn BlockDevice> = Arc::new(MemDevice::new(1 << 20));
    let c = open(cache, &[backing], Tunables::default(), 2);
    let e = c
        .write(0, 512, &[0u8; 4096], false)
        .unwrap_err()
        .to_string();
    assert!(e.contains("not aligned"), "{e}");
    let e = c
        .write(0, 1 << 20, &[0u8; 4096], false)
        .unwrap_err()
        .to_string();
    assert!(e.contains("beyond the end"), "{e}");
    let e = c.write(3, 0, &[0u8; 4096], false).unwrap_err().to_string();
    assert!(e.contains("not attached"), "{e}");
    let mut b = [0u8; 4096];
    assert!(c.read(0, u64::MAX - 100, &mut b).is_err());
    assert!(c.discard(0, 4096, u64::MAX).is_err());
    assert!(c.set_tunable("writeback_batch", "1000").is_err());
    assert!(c.drain(9, &mut |_| {}).is_err());
}

#[test]
fn dead_backing_device_fails_writes_after_the_timeout_and_recovers() {
    let cache = mem_cache(SEG as u64 * 8, 512, SEG);
    let mem = Arc::new(MemDevice::new(1 << 20));
    let bad = Arc::new(FaultDevice::new(mem.clone()));
    let good = Arc::new(MemDevice::new(1 << 20));
    let c = open(
        cache,
        &[bad.clone() as Arc<dyn BlockDevice>, good.clone()],
        Tunables {
            writeback_threshold: 0,
            writeback_fail_timeout_s: 1,
            ..Tunables::default()
        },
        2,
    );
    bad.faults.lock().unwrap().bad_write_sectors.extend(0..2048);
    let a: Vec<u8> = (0..64 * 1024u32).map(|i| (i % 251) as u8).collect();
    let b: Vec<u8> = (0..64 * 1024u32).map(|i| (i % 239) as u8).collect();
    c.write(0, 0, &a, false).unwrap();
    c.write(1, 0, &b, false).unwrap();
    // Sealed, so that writeback can take every line (an open segment, appended to by
    // a flush, is written back once sealed: full, idle or on request).
    c.seal_now().unwrap();
    // Writeback fails on device 0 and says so; device 1's lines of the same batches
    // still reach it.
    let t0 = std::time::Instant::now();
    while c.stats().writeback_failures.is_empty() {
        assert!(
            t0.elapsed() < std::time::Duration::from_secs(10),
            "no failure reported"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_eq!(c.stats().writeback_failures[0].dev, 0);
    while t0.elapsed() < std::time::Duration::from_millis(1500) {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let mut raw = vec![0u8; b.len()];
    good.read_at(&mut raw, 0).unwrap();
    assert!(raw == b, "the healthy device drained despite the dead one");
    // After the timeout, writes to the dead device fail at once instead of piling up.
    let e = c.write(0, 1 << 19, &[1u8; 4096], false).unwrap_err();
    assert!(matches!(e, Error::BackingFailed { dev: 0, .. }), "{e}");
    assert!(
        e.io_error().is_some(),
        "the backing device's error is kept: {e}"
    );
    // A drain of it (the detach step) fails the same way instead of waiting forever.
    let e = c.drain(0, &mut |_| {}).unwrap_err();
    assert!(matches!(e, Error::BackingFailed { dev: 0, .. }), "{e}");
    // Writes to the healthy device go on until the log is full behind the dead
    // device's lines; then they fail too, within a bounded time, rather than hang.
    let started = std::time::Instant::now();
    let mut refused = None;
    for i in 0..2000u64 {
        if let Err(e) = c.write(1, (i % 200) * 4096, &[2u8; 4096], true) {
            refused = Some(e);
            break;
        }
    }
    let e = refused.expect("the log never filled");
    assert!(matches!(e, Error::BackingFailed { dev: 0, .. }), "{e}");
    assert!(started.elapsed() < std::time::Duration::from_secs(20));
    // Reads are served all along; the dead device's data is all in the cache.
    let mut back = vec![0u8; a.len()];
    c.read(0, 0, &mut back).unwrap();
    assert!(back == a);
    // The device comes back: writeback recovers by itself and nothing was lost.
    bad.faults.lock().unwrap().bad_write_sectors.clear();
    let t1 = std::time::Instant::now();
    while !c.stats().writeback_failures.is_empty() {
        assert!(
            t1.elapsed() < std::time::Duration::from_secs(15),
            "no recovery"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    c.write(0, 1 << 19, &[1u8; 4096], false).unwrap();
    c.drain(0, &mut |_| {}).unwrap();
    c.close().unwrap();
    let mut raw = vec![0u8; a.len()];
    mem.read_at(&mut raw, 0).unwrap();
    assert!(raw == a, "the dead device got its data once back");
}

#[test]
fn backing_devices_attach_and_detach_while_the_cache_runs() {
    let cache = mem_cache(SEG as u64 * 8, 512, SEG);
    let a: Arc<dyn BlockDevice> = Arc::new(MemDevice::new(1 << 20));
    let b = Arc::new(MemDevice::new(1 << 20));
    let c = open(
        cache.clone(),
        std::slice::from_ref(&a),
        Tunables {
            writeback_enabled: false,
            ..Tunables::default()
        },
        2,
    );
    assert!(
        c.write(5, 0, &[1u8; 4096], false).is_err(),
        "not attached yet"
    );
    let attach = |c: &Cache| {
        c.attach_backing(lc_cache::Backing {
            id: 5,
            dev: b.clone(),
            label: "late".into(),
        })
    };
    attach(&c).unwrap();
    assert!(attach(&c).is_err(), "id taken");
    c.write(5, 0, &[7u8; 4096], true).unwrap();
    let e = c.detach_backing(5).unwrap_err().to_string();
    assert!(e.contains("dirty lines; drain it first"), "{e}");
    // The attached device and its dirty line survive a restart with it configured.
    c.close().unwrap();
    let (c, _) = Cache::open(
        cache.clone(),
        vec![
            lc_cache::Backing {
                id: 0,
                dev: a.clone(),
                label: "disk0".into(),
            },
            lc_cache::Backing {
                id: 5,
                dev: b.clone(),
                label: "late".into(),
            },
        ],
        OpenOptions::default(),
    )
    .unwrap();
    let mut buf = [0u8; 4096];
    c.read(5, 0, &mut buf).unwrap();
    assert_eq!(buf, [7u8; 4096]);
    c.drain(5, &mut |_| {}).unwrap();
    c.detach_backing(5).unwrap();
    assert!(c.read(5, 0, &mut buf).is_err(), "detached");
    c.close().unwrap();
    let mut raw = [0u8; 4096];
    b.read_at(&mut raw, 0).unwrap();
    assert_eq!(raw, [7u8; 4096], "drained before detach");
}

#[test]
fn commit_superblock_returns_once_the_superblock_is_on_the_device_and_fails_when_it_is_not() {
    // The cache device holds its next flush: the superblock is written, not yet durable.
    let cache = Gated::new(vec![0u8; SEG as usize * 8]);
    lc_cache::format_device(
        cache.as_ref(),
        lc_cache::FormatOptions {
            block_size: 512,
            segment_size: SEG,
            version: lc_cache::format::FORMAT_VERSION,
        },
    )
    .unwrap();
    let backing: Arc<dyn BlockDevice> = Arc::new(MemDevice::new(1 << 20));
    let c = Arc::new(open(
        cache.clone(),
        &[backing],
        Tunables {
            superblock_commit_interval_s: 3600,
            checkpoint_interval_segments: 0,
            ..Tunables::default()
        },
        2,
    ));
    cache.hold_next_flush();
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let t = {
        let (c, done) = (c.clone(), done.clone());
        std::thread::spawn(move || {
            let r = c.commit_superblock();
            done.store(true, std::sync::atomic::Ordering::SeqCst);
            r
        })
    };
    cache.wait_held();
    std::thread::sleep(std::time::Duration::from_millis(300));
    let early = done.load(std::sync::atomic::Ordering::SeqCst);
    cache.release();
    t.join().unwrap().unwrap();
    assert!(
        !early,
        "commit_superblock returned while the superblock's flush was held"
    );
    // A superblock the device refuses is an error, not a commit.
    cache
        .fail_writes
        .store(true, std::sync::atomic::Ordering::SeqCst);
    assert!(c.commit_superblock().is_err());
    cache
        .fail_writes
        .store(false, std::sync::atomic::Ordering::SeqCst);
    c.commit_superblock().unwrap();
    // A close whose last superblock commit fails says so.
    cache
        .fail_writes
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let c = Arc::try_unwrap(c).ok().expect("one owner");
    let e = c.close().unwrap_err();
    assert!(matches!(e, Error::Superblock(_)), "{e}");
}

#[test]
fn a_failed_discard_keeps_read_misses_of_its_device_from_being_promoted_until_a_flush() {
    // A discard the device failed may have taken effect in part, and nothing makes it
    // durable before a flush of the device: a clean copy promoted meanwhile could
    // outlive a crash that undoes it there.
    let mem: Arc<dyn BlockDevice> = Arc::new(MemDevice::new(1 << 20));
    let dev = Arc::new(FaultDevice::new(mem));
    let c = open(
        mem_cache(SEG as u64 * 8, 512, SEG),
        &[dev.clone() as Arc<dyn BlockDevice>],
        Tunables {
            read_promote_threshold: 1,
            ..Tunables::default()
        },
        2,
    );
    {
        let mut f = dev.faults.lock().unwrap();
        f.fail_discard = true;
        f.fail_flush = true;
    }
    assert!(c.discard(0, 0, 8192).is_err());
    let mut buf = vec![0u8; 8192];
    c.read(0, 0, &mut buf).unwrap();
    assert_eq!(
        c.stats().promoted_lines,
        0,
        "promoted after a failed discard"
    );
    {
        let mut f = dev.faults.lock().unwrap();
        f.fail_discard = false;
        f.fail_flush = false;
    }
    c.flush().unwrap();
    c.read(0, 0, &mut buf).unwrap();
    assert_eq!(
        c.stats().promoted_lines,
        2,
        "promoted once the device was flushed"
    );
}

#[test]
fn a_device_attached_under_a_detached_ones_id_never_reads_its_predecessors_data() {
    // Device A (id 3) has clean copies in the log (read misses promoted); it is
    // detached and device B attached under id 3 while the cache runs (killed before or
    // after B's first write), or B is given under id 3 at the next open. B must read its
    // own data after the restart, never A's copies replayed from the log.
    let lines = 16u64;
    let a = Arc::new(MemDevice::from_bytes(
        vec![0xaa; (lines * 4096) as usize],
        "a",
    ));
    let b = Arc::new(MemDevice::from_bytes(
        vec![0xbb; (lines * 4096) as usize],
        "b",
    ));
    for (write_b, attach) in [(false, true), (true, true), (false, false)] {
        let cache = mem_cache(SEG as u64 * 16, 512, SEG);
        let t = Tunables {
            writeback_enabled: false,
            read_promote_threshold: 1,
            ..Tunables::default()
        };
        let (c, _) = Cache::open(
            cache.clone(),
            vec![lc_cache::Backing {
                id: 3,
                dev: a.clone(),
                label: "a".into(),
            }],
            OpenOptions {
                tunables: t.clone(),
                ..Default::default()
            },
        )
        .unwrap();
        let mut buf = vec![0u8; (lines * 4096) as usize];
        c.read(3, 0, &mut buf).unwrap();
        assert!(c.stats().promoted_lines > 0);
        c.seal_now().unwrap();
        c.detach_backing(3).unwrap();
        if attach {
            c.attach_backing(lc_cache::Backing {
                id: 3,
                dev: b.clone(),
                label: "b".into(),
            })
            .unwrap();
        }
        if write_b {
            c.write(3, 0, &[0xcc; 4096], true).unwrap();
        }
        // Killed: no clean close.
        let mut img = vec![0u8; cache.size() as usize];
        cache.read_at(&mut img, 0).unwrap();
        std::mem::forget(c);
        let (c, report) = Cache::open(
            Arc::new(MemDevice::from_bytes(img, "cache")),
            vec![lc_cache::Backing {
                id: 3,
                dev: b.clone(),
                label: "b".into(),
            }],
            OpenOptions {
                tunables: t,
                ..Default::default()
            },
        )
        .unwrap();
        c.read(3, 0, &mut buf).unwrap();
        for (i, line) in buf.chunks(4096).enumerate() {
            let want = if write_b && i == 0 { 0xcc } else { 0xbb };
            assert!(
                line.iter().all(|&x| x == want),
                "write_b {write_b} attach {attach}: line {i} reads {:#x}, not B's {want:#x} ({report:?})",
                line[0]
            );
        }
        c.close().unwrap();
    }
}
