//! The daemon's data path end to end without a kernel: the ring emulator plays
//! target_core_user, a Device + EventLoop serve it from a cache engine on files.
//! SCSI commands of every size class and flavour, FUA and SYNCHRONIZE CACHE
//! durability across a reopen, many outstanding commands completed out of order,
//! wrap-around, and malformed entries failing one device while another keeps going.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::emulator::*;
use lc::device::{Device, EngineBackend};
use lc::event_loop::EventLoop;
use lc::ring::Ring;
use lc::scsi::cdb::{build10 as rw10, build16 as rw16};
use lc::scsi::{LunConfig, LunState};
use lc_cache::{
    format_device, Backing, BlockDevice, Cache, FileDevice, FormatOptions, OpenOptions,
};
use rand::{Rng, SeedableRng};

const BACKING: u64 = 64 << 20;

struct Files {
    _dir: tempfile::TempDir,
    cache: std::path::PathBuf,
    backing: std::path::PathBuf,
}

fn files() -> Files {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache.img");
    let backing = dir.path().join("backing.img");
    lc_cache::device::create_file(&cache, 32 << 20).unwrap();
    lc_cache::device::create_file(&backing, BACKING).unwrap();
    let dev = FileDevice::open(&cache, false).unwrap();
    format_device(
        &dev,
        FormatOptions {
            block_size: 512,
            segment_size: 256 << 10,
        },
    )
    .unwrap();
    Files {
        _dir: dir,
        cache,
        backing,
    }
}

fn open_cache(f: &Files) -> Arc<Cache> {
    let c: Arc<dyn BlockDevice> = Arc::new(FileDevice::open(&f.cache, false).unwrap());
    let b: Arc<dyn BlockDevice> = Arc::new(FileDevice::open(&f.backing, false).unwrap());
    let (cache, _) = Cache::open(
        c,
        vec![Backing {
            id: 0,
            dev: b,
            label: "disk0".into(),
        }],
        OpenOptions::default(),
    )
    .unwrap();
    Arc::new(cache)
}

/// A served device: the loop runs on its own thread until dropped.
struct Served {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<EventLoop>>,
    waker: Arc<mio::Waker>,
    failures: Arc<Mutex<Vec<String>>>,
}

impl Served {
    fn start(devs: Vec<Device>) -> Served {
        Served::start_polling(devs, Duration::ZERO)
    }

    fn start_polling(devs: Vec<Device>, busy_poll: Duration) -> Served {
        let mut el = EventLoop::new(4, slog::Logger::root(slog::Discard, slog::o!())).unwrap();
        el.set_busy_poll(busy_poll);
        for d in devs {
            el.add_device(d).unwrap();
        }
        let stop = Arc::new(AtomicBool::new(false));
        let failures = Arc::new(Mutex::new(Vec::new()));
        let waker = el.waker();
        let (s, f) = (stop.clone(), failures.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                el.run_once(Some(Duration::from_millis(50))).unwrap();
                let mut fl = f.lock().unwrap();
                fl.clear();
                for id in el.device_ids() {
                    if let Some(msg) = el.device(id).and_then(|d| d.failure()) {
                        fl.push(msg.to_string());
                    }
                }
            }
            el
        });
        Served {
            stop,
            thread: Some(thread),
            waker,
            failures,
        }
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.waker.wake();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn device(emu: &Emulator, cache: &Arc<Cache>, name: &str) -> Device {
    let lun = Arc::new(LunState::new(LunConfig::new(name, 512, BACKING / 512)));
    Device::new(
        name,
        Ring::new(emu.handler_map()).unwrap(),
        Box::new(emu.doorbell()),
        lun,
        Arc::new(EngineBackend {
            cache: cache.clone(),
            dev: 0,
        }),
        slog::Logger::root(slog::Discard, slog::o!()),
    )
}

/// Waits for completions of `ids` (any order).
fn wait_for(emu: &mut Emulator, ids: &[u16]) -> Vec<Completion> {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut got = Vec::new();
    while got.len() < ids.len() {
        assert!(
            Instant::now() < deadline,
            "timed out: {} of {} completions",
            got.len(),
            ids.len()
        );
        let mut fds = [rustix::event::PollFd::new(
            emu.kernel_fd(),
            rustix::event::PollFlags::IN,
        )];
        let _ = rustix::event::poll(
            &mut fds,
            Some(&rustix::time::Timespec {
                tv_sec: 0,
                tv_nsec: 50_000_000,
            }),
        );
        got.extend(emu.reap());
    }
    let mut ordered = Vec::new();
    for id in ids {
        let i = got
            .iter()
            .position(|c| c.cmd_id == *id)
            .expect("completion for id");
        ordered.push(got.swap_remove(i));
    }
    ordered
}

fn submit(emu: &mut Emulator, cdb: &[u8], out: &[u8], inlen: usize) -> u16 {
    // Retry while the ring or the data area is full (the kernel would queue).
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(id) = emu.submit(cdb, out, inlen) {
            return id;
        }
        assert!(Instant::now() < deadline, "ring stayed full");
        std::thread::sleep(Duration::from_millis(1));
        emu.reap();
    }
}

#[test]
fn scsi_commands_through_the_ring_reach_the_cache_and_survive_reopen() {
    let f = files();
    let cache = open_cache(&f);
    let mut emu = Emulator::small(FLAG_OOOC | FLAG_READ_LEN);
    let served = Served::start(vec![device(&emu, &cache, "disk0")]);

    let inq = submit(&mut emu, &[0x12, 0, 0, 0, 128, 0], &[], 128);
    let c = &wait_for(&mut emu, &[inq])[0];
    assert_eq!(c.status, 0);
    assert_eq!(&c.data_in[8..15], b"LIO-ORG");
    assert_eq!(
        c.data_in.len(),
        96,
        "READ_LEN trims Data-In to what INQUIRY produced"
    );

    // Writes of every size class and CDB flavour, then read them back.
    let seed: u64 = rand::random();
    println!("seed {seed}");
    let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
    let mut model = vec![0u8; 8 << 20];
    for i in 0..200 {
        let blocks = [1u32, 7, 8, 64, 256, 1024][rng.gen_range(0..6)];
        let lba = rng.gen_range(0..(model.len() as u64 / 512 - blocks as u64));
        let data: Vec<u8> = (0..blocks as usize * 512).map(|_| rng.gen()).collect();
        let cdb = if i % 2 == 0 {
            rw16(0x8a, lba, blocks, if i % 5 == 0 { 0x08 } else { 0 })
        } else {
            rw10(0x2a, lba as u32, blocks as u16, 0)
        };
        let id = submit(&mut emu, &cdb, &data, 0);
        assert_eq!(
            wait_for(&mut emu, &[id])[0].status,
            0,
            "seed {seed} write {i}"
        );
        model[lba as usize * 512..][..data.len()].copy_from_slice(&data);
        if i % 3 == 0 {
            let id = submit(&mut emu, &rw16(0x88, lba, blocks, 0), &[], data.len());
            let c = wait_for(&mut emu, &[id]).remove(0);
            assert!(
                c.status == 0 && c.data_in == data,
                "seed {seed} read back {i}"
            );
        }
    }
    // A READ whose Data-In buffer is shorter than its transfer fills what fits and
    // completes GOOD; COMPARE AND WRITE compares, writes, and reports a miscompare.
    let id = submit(&mut emu, &rw10(0x28, 0, 2, 0), &[], 512);
    let c = wait_for(&mut emu, &[id]).remove(0);
    assert_eq!(
        (c.status, &c.data_in[..]),
        (0, &model[..512]),
        "seed {seed}"
    );
    let mut caw = rw16(0x89, 3, 0, 0);
    caw[13] = 1;
    let new = vec![0xc5u8; 512];
    let id = submit(
        &mut emu,
        &caw,
        &[&model[3 * 512..4 * 512], &new[..]].concat(),
        0,
    );
    assert_eq!(wait_for(&mut emu, &[id])[0].status, 0, "seed {seed}: CAW");
    model[3 * 512..4 * 512].copy_from_slice(&new);
    let mut stale = new.clone();
    stale[100] ^= 1;
    let id = submit(&mut emu, &caw, &[&stale[..], &[0u8; 512][..]].concat(), 0);
    let c = wait_for(&mut emu, &[id]).remove(0);
    assert_eq!(
        (c.status, c.sense[2], c.sense[12]),
        (2, 0x0e, 0x1d),
        "MISCOMPARE"
    );
    assert_eq!(
        (c.sense[0] & 0x80, &c.sense[3..7]),
        (0x80, &[0, 0, 0, 100][..])
    );
    let sync = submit(&mut emu, &[0x35, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[], 0);
    assert_eq!(wait_for(&mut emu, &[sync])[0].status, 0);
    // Out-of-range and unknown commands get sense, the device keeps serving.
    let bad = submit(&mut emu, &rw16(0x88, BACKING / 512, 1, 0), &[], 512);
    let c = wait_for(&mut emu, &[bad]).remove(0);
    assert_eq!((c.status, c.sense[2], c.sense[12]), (2, 5, 0x21));
    let bad = submit(&mut emu, &[0xd0, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[], 0);
    assert_eq!(wait_for(&mut emu, &[bad])[0].sense[12], 0x20);
    drop(served);
    // Everything acknowledged after SYNCHRONIZE CACHE is there after a reopen.
    drop(Arc::try_unwrap(cache).ok().expect("sole owner"));
    let cache = open_cache(&f);
    let mut back = vec![0u8; model.len()];
    cache.read(0, 0, &mut back).unwrap();
    assert!(back == model, "seed {seed}: data after reopen");
}

#[test]
fn many_outstanding_commands_complete_out_of_order_across_wraps() {
    // Inline serving (the default), every command on a worker, and the busy poll.
    for (inline, poll) in [(true, 0), (false, 0), (true, 300)] {
        outstanding_commands(inline, Duration::from_micros(poll));
    }
}

fn outstanding_commands(inline: bool, busy_poll: Duration) {
    let f = files();
    let cache = open_cache(&f);
    // A small ring so it wraps many times.
    let mut emu = Emulator::new(8192 - CMDR_OFF as u32, 8 << 20, FLAG_OOOC);
    let mut dev = device(&emu, &cache, "disk0");
    dev.set_inline(inline);
    let served = Served::start_polling(vec![dev], busy_poll);
    let mut ids = Vec::new();
    let mut expect = Vec::new();
    for round in 0..20u32 {
        for k in 0..32u32 {
            let lba = (round * 32 + k) as u64 * 8;
            let data = vec![(round * 32 + k) as u8; 4096];
            ids.push(submit(&mut emu, &rw16(0x8a, lba, 8, 0), &data, 0));
            expect.push((lba, data));
        }
        let got = wait_for(&mut emu, &ids);
        assert!(got.iter().all(|c| c.status == 0));
        ids.clear();
    }
    for chunk in expect.chunks(32) {
        let reads: Vec<u16> = chunk
            .iter()
            .map(|(lba, _)| submit(&mut emu, &rw16(0x88, *lba, 8, 0), &[], 4096))
            .collect();
        let got = wait_for(&mut emu, &reads);
        for (c, (lba, d)) in got.iter().zip(chunk) {
            assert!(c.status == 0 && &c.data_in == d, "read of lba {lba}");
        }
    }
    drop(served);
    let mut buf = vec![0u8; 4096];
    for (lba, d) in &expect {
        cache.read(0, lba * 512, &mut buf).unwrap();
        assert!(&buf == d);
    }
}

#[test]
fn a_malformed_entry_fails_its_device_and_the_other_keeps_serving() {
    let f = files();
    let cache = open_cache(&f);
    let mut good = Emulator::small(FLAG_OOOC);
    let mut bad = Emulator::small(FLAG_OOOC);
    let served = Served::start(vec![
        device(&good, &cache, "good"),
        device(&bad, &cache, "bad"),
    ]);
    // An iovec pointing outside the map.
    let mut e = vec![0u8; 128];
    e[0..4].copy_from_slice(&(128u32 | 1).to_ne_bytes());
    e[4..6].copy_from_slice(&9u16.to_ne_bytes());
    e[8..12].copy_from_slice(&1u32.to_ne_bytes());
    e[24..32].copy_from_slice(&(CMDR_OFF + 112).to_ne_bytes());
    e[48..56].copy_from_slice(&(1u64 << 40).to_ne_bytes());
    e[56..64].copy_from_slice(&4096u64.to_ne_bytes());
    e[112] = 0x2a;
    bad.submit_raw(&e);
    let deadline = Instant::now() + Duration::from_secs(10);
    while served.failures.lock().unwrap().is_empty() {
        assert!(Instant::now() < deadline, "malformed entry not detected");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(served.failures.lock().unwrap()[0].contains("outside the data area"));
    let id = submit(&mut good, &rw10(0x2a, 0, 8, 0), &[5u8; 4096], 0);
    assert_eq!(wait_for(&mut good, &[id])[0].status, 0);
}
