//! The daemon's data path end to end without a kernel: the ring emulator plays
//! target_core_user, a Device + EventLoop serve it from a cache engine on files.
//! SCSI commands of every size class and flavour, FUA and SYNCHRONIZE CACHE
//! durability across a reopen, many outstanding commands completed out of order,
//! wrap-around, hostile entries (error completions, ring resets, SIGBUS), clean stops
//! that complete slow commands, and a hung backing device that never stalls another
//! LUN.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lc::device::{Device, EngineBackend};
use lc::emulator::*;
use lc::event_loop::EventLoop;
use lc::ring::Ring;
use lc::scsi::cdb::{build10 as rw10, build16 as rw16};
use lc::scsi::{BlockBackend, IoError};
use lc::scsi::{LunConfig, LunState};
use lc_cache::testing::HoldDevice;
use lc_cache::{
    format_device, Backing, BlockDevice, Cache, FileDevice, FormatOptions, MemDevice, OpenOptions,
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
            ..Default::default()
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
    open_cache_with(f, false)
}

/// The cache of `f`, its cache device opened with `O_DIRECT` when `direct` (the
/// daemon's default: reads of it are never page-cache hits served inline).
fn open_cache_with(f: &Files, direct: bool) -> Arc<Cache> {
    let c: Arc<dyn BlockDevice> = Arc::new(FileDevice::open(&f.cache, direct).unwrap());
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
        Served::start_loop(el, devs)
    }

    /// Runs `el` with `devs` until dropped; the drop stops the loop the way the daemon
    /// does on SIGTERM ([`EventLoop::shutdown`]).
    fn start_loop(mut el: EventLoop, devs: Vec<Device>) -> Served {
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
            drop(el.shutdown());
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
    device_on(
        emu,
        name,
        Arc::new(EngineBackend {
            cache: cache.clone(),
            dev: 0,
        }),
    )
}

fn device_on(emu: &Emulator, name: &str, backend: Arc<dyn BlockBackend>) -> Device {
    let lun = Arc::new(LunState::new(LunConfig::new(name, 512, BACKING / 512)));
    Device::new(
        name,
        Ring::new(emu.handler_map()).unwrap(),
        Box::new(emu.doorbell()),
        lun,
        backend,
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
fn a_ram_lun_from_the_config_serves_writes_and_reads_without_a_cache() {
    // `backend = "ram"`: no [[cache]], no device; the daemon's own backend for it.
    let text =
        "[daemon]\ndbus = false\n[[lun]]\nname = \"ram0\"\nbackend = \"ram\"\nsize = \"64MiB\"\n";
    let cfg = lc::config::parse(text, std::path::Path::new("lc.toml")).unwrap();
    let shared =
        lc::daemon::Shared::open(cfg, slog::Logger::root(slog::Discard, slog::o!())).unwrap();
    assert!(shared.lun_backend("disk0").is_err());
    let be = shared.lun_backend("ram0").unwrap();
    assert_eq!((be.capacity, be.block_size), (BACKING, 512));
    let mut emu = Emulator::small(FLAG_OOOC | FLAG_READ_LEN);
    let served = Served::start(vec![device_on(&emu, "ram0", be.backend)]);

    // Unwritten blocks read as zeros.
    let id = submit(&mut emu, &rw16(0x88, 100, 8, 0), &[], 4096);
    let c = wait_for(&mut emu, &[id]).remove(0);
    assert!(c.status == 0 && c.data_in == vec![0u8; 4096]);
    // Many writes in flight at once (served on the loop thread), then read back.
    let mut rng = rand::rngs::SmallRng::seed_from_u64(7);
    let mut model = vec![0u8; BACKING as usize];
    for round in 0..8 {
        let mut ids = Vec::new();
        for _ in 0..16 {
            let blocks = [1u32, 8, 64, 256][rng.gen_range(0..4)];
            let lba = rng.gen_range(0..BACKING / 512 - blocks as u64);
            let data: Vec<u8> = (0..blocks as usize * 512).map(|_| rng.gen()).collect();
            let fua = if round % 2 == 0 { 0x08 } else { 0 };
            ids.push(submit(&mut emu, &rw16(0x8a, lba, blocks, fua), &data, 0));
            model[lba as usize * 512..][..data.len()].copy_from_slice(&data);
        }
        assert!(wait_for(&mut emu, &ids).iter().all(|c| c.status == 0));
    }
    let sync = submit(&mut emu, &[0x35, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[], 0);
    assert_eq!(wait_for(&mut emu, &[sync])[0].status, 0);
    for lba in (0..BACKING / 512).step_by(2048) {
        let id = submit(&mut emu, &rw16(0x88, lba, 2048, 0), &[], 1 << 20);
        let c = wait_for(&mut emu, &[id]).remove(0);
        assert_eq!(c.status, 0);
        assert!(
            c.data_in[..] == model[lba as usize * 512..][..1 << 20],
            "read back at {lba}"
        );
    }
    // The last block, then one past the end: CHECK CONDITION, LBA OUT OF RANGE.
    write_then_read_back(&mut emu, BACKING / 512 - 8, 0x5a);
    let bad = submit(&mut emu, &rw16(0x88, BACKING / 512, 1, 0), &[], 512);
    let c = wait_for(&mut emu, &[bad]).remove(0);
    assert_eq!((c.status, c.sense[2], c.sense[12]), (2, 5, 0x21));
    drop(served);
}

/// A raw WRITE(10) CMD entry of 1 block with these iovecs.
fn raw_write(iovs: &[(u64, u64)]) -> Vec<u8> {
    let base = (48 + 16 * iovs.len()).max(112);
    let mut e = vec![0u8; base + 16];
    let len = e.len() as u32;
    e[0..4].copy_from_slice(&(len | 1).to_ne_bytes());
    e[8..12].copy_from_slice(&(iovs.len() as u32).to_ne_bytes());
    e[24..32].copy_from_slice(&(CMDR_OFF + base as u64).to_ne_bytes());
    for (i, (o, l)) in iovs.iter().enumerate() {
        e[48 + 16 * i..56 + 16 * i].copy_from_slice(&o.to_ne_bytes());
        e[56 + 16 * i..64 + 16 * i].copy_from_slice(&l.to_ne_bytes());
    }
    e[base..base + 10].copy_from_slice(&rw10(0x2a, 0, 1, 0));
    e
}

fn write_then_read_back(emu: &mut Emulator, lba: u64, byte: u8) {
    let id = submit(emu, &rw16(0x8a, lba, 8, 0), &[byte; 4096], 0);
    assert_eq!(wait_for(emu, &[id])[0].status, 0, "write at {lba}");
    let id = submit(emu, &rw16(0x88, lba, 8, 0), &[], 4096);
    let c = wait_for(emu, &[id]).remove(0);
    assert!(
        c.status == 0 && c.data_in == vec![byte; 4096],
        "read at {lba}"
    );
}

#[test]
fn hostile_iovecs_get_check_condition_and_the_same_lun_keeps_serving() {
    let f = files();
    let cache = open_cache(&f);
    let mut emu = Emulator::small(FLAG_OOOC);
    let served = Served::start(vec![device(&emu, &cache, "disk0")]);
    let data = emu.data_off;
    let whole = emu.map_len as u64 - data;
    let cases = [
        // 64 copies of the whole data area: the old code allocated 64 x 4 MiB.
        ("overlapping", raw_write(&[(data, whole); 64])),
        ("outside the map", raw_write(&[(1 << 40, 4096)])),
        ("in the command ring", raw_write(&[(CMDR_OFF, 512)])),
    ];
    for (i, (what, e)) in cases.iter().enumerate() {
        let id = emu.submit_raw_cmd(e);
        let c = wait_for(&mut emu, &[id]).remove(0);
        assert_eq!(
            (c.status, c.sense[2], c.sense[12], c.sense[13]),
            (2, 4, 0x44, 0),
            "{what}: CHECK CONDITION, HARDWARE ERROR / INTERNAL TARGET FAILURE"
        );
        write_then_read_back(&mut emu, 8 * i as u64, i as u8 + 1);
    }
    assert!(served.failures.lock().unwrap().is_empty());
}

#[test]
fn an_entry_that_breaks_the_ring_resets_it_and_the_lun_serves_again() {
    let f = files();
    let cache = open_cache(&f);
    let mut emu = Emulator::small(FLAG_OOOC);
    let served = Served::start(vec![device(&emu, &cache, "disk0")]);
    write_then_read_back(&mut emu, 0, 1);
    // A length running past cmd_head: the next entry cannot be found.
    let mut e = raw_write(&[]);
    e[0..4].copy_from_slice(&(16384u32 | 1).to_ne_bytes());
    emu.submit_raw(&e);
    let deadline = Instant::now() + Duration::from_secs(10);
    while emu.resets() == 0 {
        assert!(Instant::now() < deadline, "ring not reset");
        std::thread::sleep(Duration::from_millis(5));
    }
    for i in 1..20 {
        write_then_read_back(&mut emu, 8 * i, i as u8);
    }
    assert_eq!(emu.resets(), 1);
    assert!(served.failures.lock().unwrap().is_empty());
}

#[test]
fn a_broken_ring_without_reset_fails_its_device_and_the_other_keeps_serving() {
    let f = files();
    let cache = open_cache(&f);
    let mut good = Emulator::small(FLAG_OOOC);
    let mut bad = Emulator::small(FLAG_OOOC);
    bad.set_can_reset(false);
    let served = Served::start(vec![
        device(&good, &cache, "good"),
        device(&bad, &cache, "bad"),
    ]);
    let mut e = raw_write(&[]);
    e[0..4].copy_from_slice(&1u32.to_ne_bytes()); // length 0
    bad.submit_raw(&e);
    let deadline = Instant::now() + Duration::from_secs(10);
    while served.failures.lock().unwrap().is_empty() {
        assert!(Instant::now() < deadline, "broken ring not detected");
        std::thread::sleep(Duration::from_millis(10));
    }
    let why = served.failures.lock().unwrap()[0].clone();
    assert!(why.contains("cannot reset"), "{why}");
    write_then_read_back(&mut good, 0, 5);
}

#[test]
fn a_sigbus_on_one_mapping_fails_that_device_and_the_other_keeps_serving() {
    let f = files();
    let cache = open_cache(&f);
    let mut good = Emulator::small(FLAG_OOOC);
    // In a real mapping, so the memory can be taken away.
    let mut bad = Emulator::new_mapped((64 << 10) - CMDR_OFF as u32, 4 << 20, FLAG_OOOC);
    let served = Served::start(vec![
        device(&good, &cache, "good"),
        device(&bad, &cache, "bad"),
    ]);
    write_then_read_back(&mut bad, 0, 3);
    // The kernel removes the device's memory; the handler touches it on the next event.
    bad.truncate_backing();
    bad.ring_doorbell();
    let deadline = Instant::now() + Duration::from_secs(10);
    while served.failures.lock().unwrap().is_empty() {
        assert!(
            Instant::now() < deadline,
            "SIGBUS not turned into a device failure"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let why = served.failures.lock().unwrap()[0].clone();
    assert!(why.contains("SIGBUS"), "{why}");
    for i in 0..10 {
        write_then_read_back(&mut good, 8 * i, i as u8);
    }
}

/// A backend whose writes take `delay` (a slow disk), recording the threads that ran
/// them.
struct SlowWrites {
    inner: EngineBackend,
    delay: Duration,
    started: AtomicUsize,
    finished: AtomicUsize,
    /// Each thread that ran a write holds a clone until it exits.
    threads_alive: Arc<()>,
}

thread_local! {
    static HOLD: std::cell::RefCell<Option<Arc<()>>> = const { std::cell::RefCell::new(None) };
}

impl SlowWrites {
    fn new(cache: &Arc<Cache>, delay: Duration) -> Arc<SlowWrites> {
        Arc::new(SlowWrites {
            inner: EngineBackend {
                cache: cache.clone(),
                dev: 0,
            },
            delay,
            started: AtomicUsize::new(0),
            finished: AtomicUsize::new(0),
            threads_alive: Arc::new(()),
        })
    }

    fn wait_started(&self, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.started.load(Ordering::SeqCst) < n {
            assert!(Instant::now() < deadline, "slow command never started");
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

impl BlockBackend for SlowWrites {
    fn read(&self, offset: u64, bufs: &mut [&mut [u8]]) -> Result<(), IoError> {
        self.inner.read(offset, bufs)
    }
    fn write(&self, offset: u64, data: &[&[u8]], fua: bool) -> Result<(), IoError> {
        HOLD.with(|h| *h.borrow_mut() = Some(self.threads_alive.clone()));
        self.started.fetch_add(1, Ordering::SeqCst);
        std::thread::sleep(self.delay);
        let r = self.inner.write(offset, data, fua);
        self.finished.fetch_add(1, Ordering::SeqCst);
        r
    }
    fn flush(&self) -> Result<(), IoError> {
        self.inner.flush()
    }
    fn discard(&self, offset: u64, len: u64) -> Result<(), IoError> {
        self.inner.discard(offset, len)
    }
}

#[test]
fn a_clean_stop_completes_a_slow_command_and_publishes_the_tail_before_workers_exit() {
    let f = files();
    let cache = open_cache(&f);
    let mut emu = Emulator::small(FLAG_OOOC);
    let slow = SlowWrites::new(&cache, Duration::from_millis(1500));
    let mut dev = device_on(&emu, "disk0", slow.clone());
    dev.set_inline(false);
    let served = Served::start(vec![dev]);
    let id = submit(&mut emu, &rw16(0x8a, 0, 8, 0), &[9u8; 4096], 0);
    slow.wait_started(1);
    // SIGTERM while the write is on a worker (the old loop gave up after 1 s).
    drop(served);
    assert_eq!(slow.finished.load(Ordering::SeqCst), 1);
    let done = emu.reap();
    assert_eq!(
        done.iter()
            .map(|c| (c.cmd_id, c.status))
            .collect::<Vec<_>>(),
        vec![(id, 0)],
        "the slow write's completion and the tail are published by the stop"
    );
    assert_eq!(
        Arc::strong_count(&slow.threads_alive),
        1,
        "worker threads have exited when the stop returns"
    );
    let mut buf = vec![0u8; 4096];
    cache.read(0, 0, &mut buf).unwrap();
    assert_eq!(buf, vec![9u8; 4096]);
}

#[test]
fn removing_a_device_waits_for_its_slow_command_while_the_others_are_served() {
    let f = files();
    let cache = open_cache(&f);
    let mut a = Emulator::small(FLAG_OOOC);
    let mut b = Emulator::small(FLAG_OOOC);
    let slow = SlowWrites::new(&cache, Duration::from_millis(1500));
    let mut el = EventLoop::new(4, slog::Logger::root(slog::Discard, slog::o!())).unwrap();
    let ida = el.add_device(device_on(&a, "a", slow.clone())).unwrap();
    el.add_device(device(&b, &cache, "b")).unwrap();
    let id = submit(&mut a, &rw16(0x8a, 0, 8, 0), &[4u8; 4096], 0);
    let deadline = Instant::now() + Duration::from_secs(10);
    while slow.started.load(Ordering::SeqCst) == 0 {
        assert!(Instant::now() < deadline);
        el.run_once(Some(Duration::from_millis(10))).unwrap();
    }
    // Another LUN's initiator, during the removal.
    let other = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(100));
        let t = Instant::now();
        write_then_read_back(&mut b, 64, 6);
        t.elapsed()
    });
    let dev = el.remove_device(ida).expect("device");
    assert_eq!(dev.busy(), 0);
    let done = a.reap();
    assert_eq!(
        done.iter()
            .map(|c| (c.cmd_id, c.status))
            .collect::<Vec<_>>(),
        vec![(id, 0)]
    );
    let took = other.join().unwrap();
    assert!(
        took < Duration::from_millis(1000),
        "the other LUN waited {took:?} during the removal"
    );
}

/// A disk whose reads wait while it is held (a hung HDD), and always need waiting
/// (never served inline).
fn hanging_disk(size: u64, held: bool) -> Arc<HoldDevice> {
    Arc::new(HoldDevice::new(Arc::new(MemDevice::new(size)), held))
}

#[test]
fn a_hung_backing_device_never_stalls_another_lun() {
    let cache_dev: Arc<dyn BlockDevice> = Arc::new(MemDevice::new(32 << 20));
    format_device(
        cache_dev.as_ref(),
        FormatOptions {
            block_size: 512,
            segment_size: 256 << 10,
            ..Default::default()
        },
    )
    .unwrap();
    let stuck = hanging_disk(BACKING, true);
    let healthy = hanging_disk(BACKING, false);
    let (cache, _) = Cache::open(
        cache_dev,
        vec![
            Backing {
                id: 0,
                dev: stuck.clone(),
                label: "stuck".into(),
            },
            Backing {
                id: 1,
                dev: healthy.clone(),
                label: "healthy".into(),
            },
        ],
        OpenOptions::default(),
    )
    .unwrap();
    let cache = Arc::new(cache);
    let mut a = Emulator::small(FLAG_OOOC);
    let mut b = Emulator::small(FLAG_OOOC);
    let be = |dev| -> Arc<dyn BlockBackend> {
        Arc::new(EngineBackend {
            cache: cache.clone(),
            dev,
        })
    };
    let mut el = EventLoop::new(4, slog::Logger::root(slog::Discard, slog::o!())).unwrap();
    el.set_queue_deadline(Duration::from_millis(1500));
    let served = Served::start_loop(
        el,
        vec![
            device_on(&a, "stuck", be(0)),
            device_on(&b, "healthy", be(1)),
        ],
    );
    // Eight reads on the hung LUN: four hold its workers, four wait for them.
    let hung: Vec<u16> = (0..8u64)
        .map(|i| submit(&mut a, &rw16(0x88, i * 8, 8, 0), &[], 4096))
        .collect();
    let deadline = Instant::now() + Duration::from_secs(10);
    while stuck.reads() < 4 {
        assert!(
            Instant::now() < deadline,
            "hung reads never reached the disk"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    // The healthy LUN's 4 KiB reads (misses: they go to its disk through a worker).
    for i in 0..5u64 {
        let t = Instant::now();
        let id = submit(&mut b, &rw16(0x88, i * 8, 8, 0), &[], 4096);
        let c = wait_for(&mut b, &[id]).remove(0);
        let took = t.elapsed();
        assert_eq!(c.status, 0);
        assert!(
            took < Duration::from_millis(100),
            "healthy LUN's READ took {took:?} while another LUN is hung"
        );
    }
    assert!(healthy.reads() >= 5, "reads reached the disk");
    assert_eq!(stuck.reads(), 4, "at most 4 workers per LUN");
    // The four that never got a worker come back as errors, not hangs.
    let expired = wait_for(&mut a, &hung[4..]);
    for c in &expired {
        assert_eq!(
            (c.status, c.sense[2], c.sense[12], c.sense[13]),
            (2, 0x0b, 0x2e, 0x01),
            "ABORTED COMMAND / COMMAND TIMEOUT BEFORE PROCESSING"
        );
    }
    stuck.release();
    let released = wait_for(&mut a, &hung[..4]);
    assert!(released
        .iter()
        .all(|c| c.status == 0 && c.data_in == vec![0u8; 4096]));
    drop(served);
}

#[test]
fn a_ring_reset_waits_until_the_workers_have_handed_back_the_devices_commands() {
    let f = files();
    let cache = open_cache(&f);
    let mut emu = Emulator::small(FLAG_OOOC);
    let slow = SlowWrites::new(&cache, Duration::from_millis(500));
    let mut dev = device_on(&emu, "disk0", slow.clone());
    dev.set_inline(false);
    let served = Served::start(vec![dev]);
    let id = submit(&mut emu, &rw16(0x8a, 0, 8, 0), &[1u8; 4096], 0);
    slow.wait_started(1);
    let mut e = raw_write(&[]);
    e[0..4].copy_from_slice(&(16384u32 | 1).to_ne_bytes());
    emu.submit_raw(&e);
    let deadline = Instant::now() + Duration::from_secs(10);
    while emu.resets() == 0 {
        assert!(Instant::now() < deadline, "ring not reset");
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(
        slow.finished.load(Ordering::SeqCst),
        1,
        "the ring was reset while a worker still ran one of its commands"
    );
    // The kernel completed it (BUSY) with the reset; the handler must not complete
    // it again (the emulator panics on an unknown id, as a real ring breaks).
    let done = emu.reap();
    assert_eq!(
        done.iter()
            .map(|c| (c.cmd_id, c.status))
            .collect::<Vec<_>>(),
        vec![(id, BUSY)]
    );
    let id = submit(&mut emu, &rw16(0x88, 0, 8, 0), &[], 4096);
    let c = wait_for(&mut emu, &[id]).remove(0);
    assert_eq!(c.status, 0);
    assert!(served.failures.lock().unwrap().is_empty());
}

/// A logger that keeps every record as "message key=value ...".
#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<String>>>);

impl slog::Drain for Capture {
    type Ok = ();
    type Err = slog::Never;
    fn log(&self, r: &slog::Record, _: &slog::OwnedKVList) -> Result<(), slog::Never> {
        struct Line<'a>(&'a mut String);
        impl slog::Serializer for Line<'_> {
            fn emit_arguments(&mut self, k: slog::Key, v: &std::fmt::Arguments) -> slog::Result {
                self.0.push_str(&format!(" {k}={v}"));
                Ok(())
            }
        }
        let mut s = r.msg().to_string();
        let _ = slog::KV::serialize(&r.kv(), r, &mut Line(&mut s));
        self.0.lock().unwrap().push(s);
        Ok(())
    }
}

#[test]
fn a_stop_gives_up_on_a_hung_command_after_the_bound_and_logs_which() {
    let cache_dev: Arc<dyn BlockDevice> = Arc::new(MemDevice::new(32 << 20));
    format_device(
        cache_dev.as_ref(),
        FormatOptions {
            block_size: 512,
            segment_size: 256 << 10,
            ..Default::default()
        },
    )
    .unwrap();
    let disk = hanging_disk(BACKING, true);
    let (cache, _) = Cache::open(
        cache_dev,
        vec![Backing {
            id: 0,
            dev: disk.clone(),
            label: "hung".into(),
        }],
        OpenOptions::default(),
    )
    .unwrap();
    let cache = Arc::new(cache);
    let mut emu = Emulator::small(FLAG_OOOC);
    let logs = Capture::default();
    let mut el = EventLoop::new(4, slog::Logger::root(logs.clone(), slog::o!())).unwrap();
    el.set_stop_bound(Duration::from_millis(300));
    el.add_device(device(&emu, &cache, "disk0")).unwrap();
    let id = submit(&mut emu, &rw16(0x88, 0, 8, 0), &[], 4096);
    let deadline = Instant::now() + Duration::from_secs(10);
    while disk.reads() == 0 {
        assert!(Instant::now() < deadline, "read never reached the disk");
        el.run_once(Some(Duration::from_millis(10))).unwrap();
    }
    let t = Instant::now();
    let devs = el.shutdown();
    let took = t.elapsed();
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_secs(3),
        "the stop took {took:?} with a 300 ms bound"
    );
    assert_eq!(devs[0].busy(), 1, "the hung command is left unanswered");
    assert!(emu.reap().is_empty());
    let lines = logs.0.lock().unwrap().clone();
    let said = lines
        .iter()
        .find(|l| l.contains("still running after the bound"))
        .unwrap_or_else(|| panic!("no log of the hung command: {lines:#?}"));
    assert!(
        said.contains(&format!("cmd_id: {id}")) && said.contains("READ"),
        "{said}"
    );
    disk.release();
}

/// A byte pattern that differs in every sector.
fn pattern(len: usize, salt: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(13) ^ salt ^ (i >> 9) as u8)
        .collect()
}

/// Writes 41 blocks at LBA 1 of a 512-byte LUN from a fragmented data area (one 4 KiB
/// iovec per data block, so every 4 KiB line of the write crosses an iovec boundary
/// 512 bytes in), reads them back into fragmented Data-In (from RAM, and from the cache
/// device after a seal when `cache` is given), and a Data-In shorter than its READ
/// that ends inside a block.
fn lines_across_iovecs(emu: &mut Emulator, cache: Option<&Arc<Cache>>) {
    emu.set_fragmented(true);
    let data = pattern(41 * 512, 0x5a);
    let id = submit(emu, &rw16(0x8a, 1, 41, 0), &data, 0);
    assert!(emu.iovs_of(id).len() > 1, "scattered Data-Out");
    assert_eq!(wait_for(emu, &[id])[0].status, 0);
    let mut want = vec![0u8; 48 * 512];
    want[512..512 + data.len()].copy_from_slice(&data);
    let read_all = |emu: &mut Emulator, want: &[u8], what: &str| {
        for (lba, n) in [(0u64, 48u32), (1, 41), (3, 17), (9, 8)] {
            let id = submit(emu, &rw16(0x88, lba, n, 0), &[], n as usize * 512);
            let c = wait_for(emu, &[id]).remove(0);
            let (a, b) = (lba as usize * 512, (lba as usize + n as usize) * 512);
            assert_eq!(c.status, 0, "{what}: read {lba}+{n}");
            assert!(c.data_in == want[a..b], "{what}: read {lba}+{n} differs");
        }
        // 700 bytes of Data-In for a 2-block READ: 1 block and a part, filled in place.
        let id = submit(emu, &rw16(0x88, 2, 2, 0), &[], 700);
        let c = wait_for(emu, &[id]).remove(0);
        assert_eq!(c.status, 0, "{what}: short read");
        assert_eq!(c.data_in, want[1024..1024 + 700], "{what}: short read");
    };
    read_all(emu, &want, "after the write");
    // A partial overwrite whose lines are merged with what is cached.
    let data2 = pattern(3 * 512, 0x11);
    let id = submit(emu, &rw16(0x8a, 7, 3, 0), &data2, 0);
    assert_eq!(wait_for(emu, &[id])[0].status, 0);
    want[7 * 512..10 * 512].copy_from_slice(&data2);
    read_all(emu, &want, "after a partial overwrite");
    if let Some(c) = cache {
        c.seal_now().unwrap();
        c.flush().unwrap();
        read_all(emu, &want, "from the cache device");
    }
    emu.set_fragmented(false);
}

#[test]
fn writes_and_reads_whose_lines_cross_iovec_boundaries_land_where_they_belong() {
    for inline in [true, false] {
        let f = files();
        let cache = open_cache(&f);
        let mut emu = Emulator::small(FLAG_OOOC | FLAG_READ_LEN);
        let mut dev = device(&emu, &cache, "disk0");
        dev.set_inline(inline);
        let served = Served::start(vec![dev]);
        lines_across_iovecs(&mut emu, Some(&cache));
        assert!(served.failures.lock().unwrap().is_empty());
        drop(served);
    }
    // The RAM backend takes the same scattered pieces.
    let mut emu = Emulator::small(FLAG_OOOC | FLAG_READ_LEN);
    let ram = Arc::new(lc::ram::RamBackend::new(BACKING));
    let served = Served::start(vec![device_on(&emu, "ram0", ram)]);
    lines_across_iovecs(&mut emu, None);
    drop(served);
}

#[test]
fn a_command_whose_data_overlaps_a_running_commands_data_is_refused_and_both_lun_and_data_survive()
{
    let f = files();
    let cache = open_cache(&f);
    let mut emu = Emulator::small(FLAG_OOOC);
    let slow = SlowWrites::new(&cache, Duration::from_millis(500));
    let mut dev = device_on(&emu, "disk0", slow.clone());
    dev.set_inline(false);
    let served = Served::start(vec![dev]);
    let data = pattern(4096, 3);
    let id = submit(&mut emu, &rw16(0x8a, 8, 8, 0), &data, 0);
    slow.wait_started(1);
    // An entry naming a block the running WRITE holds (a broken kernel would).
    let (off, _) = emu.iovs_of(id)[0];
    let bad = emu.submit_raw_cmd(&raw_write(&[(off, 512)]));
    let c = wait_for(&mut emu, &[bad]).remove(0);
    assert_eq!(
        (c.status, c.sense[2], c.sense[12]),
        (2, 4, 0x44),
        "CHECK CONDITION, HARDWARE ERROR / INTERNAL TARGET FAILURE"
    );
    assert_eq!(wait_for(&mut emu, &[id])[0].status, 0, "the slow WRITE");
    let id = submit(&mut emu, &rw16(0x88, 8, 8, 0), &[], 4096);
    let c = wait_for(&mut emu, &[id]).remove(0);
    assert!(c.status == 0 && c.data_in == data, "its data is intact");
    assert!(served.failures.lock().unwrap().is_empty());
}

#[test]
fn reads_of_data_on_the_cache_device_go_through_io_uring_and_the_rest_to_the_workers() {
    // Lines written and flushed to the cache device are read by the loop's io_uring
    // straight into the Data-In (iovecs cut at odd places); reads that need the
    // backing device go to the workers. Every byte read back is what was written
    // (zeros where nothing was).
    let f = files();
    let cache = open_cache_with(&f, true);
    let mut emu = Emulator::new_mapped((1 << 20) - CMDR_OFF as u32, 8 << 20, FLAG_OOOC);
    let el = UringLoop::start(&emu, &cache);
    // 48 lines at every other 4 KiB block, and a 64 KiB run.
    let mut model = vec![0u8; 1 << 20];
    let mut ids = Vec::new();
    for k in 0..48u64 {
        let d = pattern(4096, k as u8);
        model[(k * 8192) as usize..(k * 8192 + 4096) as usize].copy_from_slice(&d);
        ids.push(submit(&mut emu, &rw16(0x8a, k * 16, 8, 0), &d, 0));
    }
    let run = pattern(65536, 0xa5);
    model[512 << 10..(512 << 10) + 65536].copy_from_slice(&run);
    ids.push(submit(&mut emu, &rw16(0x8a, 1024, 128, 0), &run, 0));
    assert!(wait_for(&mut emu, &ids).iter().all(|c| c.status == 0));
    cache.seal_now().unwrap();
    cache.flush().unwrap();
    let read = |emu: &mut Emulator, off: usize, len: usize| {
        submit(
            emu,
            &rw16(0x88, off as u64 / 512, len as u32 / 512, 0),
            &[],
            len,
        )
    };
    for fragmented in [false, true] {
        emu.set_fragmented(fragmented);
        // Each written line alone, 32 at a time.
        let mut ids = Vec::new();
        for k in 0..48usize {
            ids.push((read(&mut emu, k * 8192, 4096), k * 8192, 4096));
        }
        // The run whole and in parts, sector-granular edges included.
        for (off, len) in [
            (512 << 10, 65536),
            ((512 << 10) + 4096, 8192),
            ((512 << 10) + 512, 3072),
        ] {
            ids.push((read(&mut emu, off, len), off, len));
        }
        // Cached lines with uncached ones between: the workers' path (the first time).
        ids.push((read(&mut emu, 0, 65536), 0, 65536));
        let got = wait_for(&mut emu, &ids.iter().map(|x| x.0).collect::<Vec<_>>());
        for (c, &(_, off, len)) in got.iter().zip(&ids) {
            assert_eq!(c.status, 0, "read at {off}+{len}");
            assert!(
                c.data_in == model[off..off + len],
                "read at {off}+{len} (fragmented {fragmented})"
            );
        }
    }
    // 48 lines and the 2 parts of the run made of whole lines, twice (the 3 KiB inside
    // one line goes to a worker, which reads the whole line to check its crc); the
    // mixed read the second time only (the first, on the workers, promoted the
    // uncached lines it read whole).
    if let Some(uring) = el.stop() {
        assert_eq!(uring, 2 * 50 + 1, "reads answered from io_uring");
    }
}

#[test]
fn a_rotten_line_read_through_io_uring_fails_with_medium_error_not_wrong_data() {
    // A line on the cache device rots while it is served (a bit flipped under the
    // daemon): the loop's io_uring reads it, the engine's check refuses the bytes, and
    // the worker's read reports UNRECOVERED READ ERROR at its first block. The other
    // lines read as written, through io_uring.
    let f = files();
    let cache = open_cache_with(&f, true);
    let mut emu = Emulator::new_mapped((1 << 20) - CMDR_OFF as u32, 8 << 20, FLAG_OOOC);
    let el = UringLoop::start(&emu, &cache);
    let mut ids = Vec::new();
    for k in 0..8u64 {
        ids.push(submit(
            &mut emu,
            &rw16(0x8a, k * 8, 8, 0),
            &pattern(4096, k as u8),
            0,
        ));
    }
    assert!(wait_for(&mut emu, &ids).iter().all(|c| c.status == 0));
    cache.seal_now().unwrap();
    cache.flush().unwrap();
    // A sound line, through io_uring.
    let r = submit(&mut emu, &rw16(0x88, 0, 8, 0), &[], 4096);
    assert!(wait_for(&mut emu, &[r])[0].data_in == pattern(4096, 0));
    {
        use std::os::unix::fs::FileExt;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&f.cache)
            .unwrap();
        // Line 5's slot in segment 1, from its header (the writes may have been taken
        // in any order).
        let g = cache.geometry();
        let mut img = vec![0u8; g.segment_offset(2) as usize];
        file.read_exact_at(&mut img, 0).unwrap();
        let sb = lc_cache::format::Superblock::decode(&img[..lc_cache::format::SB_COPY_SIZE], "c")
            .unwrap();
        let off = g.segment_offset(1) as usize;
        let (h, _) =
            lc_cache::format::newest_header(&img[off..off + g.data_start()], &g, 1, &sb.uuid)
                .expect("segment 1's header");
        let slot = h
            .entries
            .iter()
            .position(|e| e.sector == 5 * 8)
            .expect("line 5");
        let at = g.line_offset(1, slot as u32) + 300;
        let mut b = [0u8; 1];
        file.read_exact_at(&mut b, at).unwrap();
        b[0] ^= 0x40;
        file.write_all_at(&b, at).unwrap();
        file.sync_all().unwrap();
    }
    let rotten = submit(&mut emu, &rw16(0x88, 5 * 8, 8, 0), &[], 4096);
    let c = &wait_for(&mut emu, &[rotten])[0];
    assert_eq!(
        (c.status, c.sense[2] & 0x0f, c.sense[12], c.sense[13]),
        (2, 3, 0x11, 0),
        "MEDIUM ERROR, UNRECOVERED READ ERROR"
    );
    assert_eq!(
        &c.sense[3..7],
        &40u32.to_be_bytes(),
        "INFORMATION: block 40"
    );
    for k in (0..8u64).filter(|&k| k != 5) {
        let r = submit(&mut emu, &rw16(0x88, k * 8, 8, 0), &[], 4096);
        let c = &wait_for(&mut emu, &[r])[0];
        assert_eq!(c.status, 0, "line {k}");
        assert!(c.data_in == pattern(4096, k as u8), "line {k}");
    }
    assert_eq!(cache.failure(), None);
    // The sound line before the flip and the seven after it; the rotten one was read
    // there and refused (then read again on a worker). A loss does not send the other
    // lines' reads to the workers.
    if let Some(uring) = el.stop() {
        assert_eq!(uring, 8);
    }
}

/// An event loop with io_uring serving a cache as one device, on a thread. Nothing is
/// served inline: a read the page cache holds (a file system that refused O_DIRECT,
/// e.g. an old tmpfs) still takes the io_uring path.
struct UringLoop {
    id: usize,
    stop: Arc<AtomicBool>,
    waker: Arc<mio::Waker>,
    thread: std::thread::JoinHandle<EventLoop>,
}

impl UringLoop {
    fn start(emu: &Emulator, cache: &Arc<Cache>) -> Self {
        let mut el = EventLoop::new(4, slog::Logger::root(slog::Discard, slog::o!())).unwrap();
        el.enable_io_uring();
        if !el.io_uring() {
            eprintln!("io_uring refused by this kernel: only the workers' path was tested");
        }
        let mut dev = device(emu, cache, "disk0");
        dev.set_inline(false);
        let id = el.add_device(dev).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let waker = el.waker();
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                el.run_once(Some(Duration::from_millis(20))).unwrap();
            }
            el
        });
        UringLoop {
            id,
            stop,
            waker,
            thread,
        }
    }

    /// Stops the loop; how many READs its io_uring answered (`None`: the kernel
    /// refused io_uring, and none was).
    fn stop(self) -> Option<u64> {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.waker.wake();
        let mut el = self.thread.join().unwrap();
        let uring = el.device(self.id).unwrap().uring_reads();
        let on = el.io_uring();
        drop(el.shutdown());
        assert!(on || uring == 0);
        on.then_some(uring)
    }
}
