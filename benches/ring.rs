//! Ring benchmark: 4 KiB random writes and reads through the TCMU ring emulator, the
//! event loop, the I/O workers and the engine, at queue depths 1, 32 and 128, with
//! IOPS and p50/p99 latency, beside engine-only figures of the same run. Each row runs
//! three times: every command on a worker ("workers only"), with the non-blocking
//! commands served on the loop thread ("inline", the daemon's default), and inline with
//! the loop busy-polling the ring for 50 µs before it sleeps (`busy_poll_us`).
//!
//! Run: `cargo bench --bench ring` (env `LC_BENCH_OPS`, default 20000 per row).

#[path = "../tests/common/emulator.rs"]
mod emulator;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use emulator::{Emulator, FLAG_OOOC, FLAG_READ_LEN};
use lc::device::{Device, EngineBackend};
use lc::event_loop::EventLoop;
use lc::ring::Ring;
use lc::scsi::cdb::build16;
use lc::scsi::{LunConfig, LunState};
use lc_cache::{
    format_device, Backing, BlockDevice, Cache, FileDevice, FormatOptions, OpenOptions, Tunables,
};
use rand::{Rng, SeedableRng};

const BACKING: u64 = 1 << 30;
const WORKERS: usize = 4;

fn pct(v: &mut [Duration], p: f64) -> Duration {
    v.sort();
    v[((v.len() as f64 * p) as usize).min(v.len() - 1)]
}

fn main() {
    let ops: usize = std::env::var("LC_BENCH_OPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20000);
    let dir = tempfile::tempdir_in(".").expect("scratch dir");
    let cpath = dir.path().join("cache.img");
    let bpath = dir.path().join("backing.img");
    lc_cache::device::create_file(&cpath, 512 << 20).unwrap();
    lc_cache::device::create_file(&bpath, BACKING).unwrap();
    let cdev: Arc<dyn BlockDevice> = Arc::new(FileDevice::open(&cpath, false).unwrap());
    format_device(cdev.as_ref(), FormatOptions::default()).unwrap();
    let bdev: Arc<dyn BlockDevice> = Arc::new(FileDevice::open(&bpath, false).unwrap());
    let (cache, _) = Cache::open(
        cdev,
        vec![Backing {
            id: 0,
            dev: bdev,
            label: "bench".into(),
        }],
        OpenOptions {
            tunables: Tunables {
                writeback_enabled: false,
                ..Tunables::default()
            },
            ..Default::default()
        },
    )
    .unwrap();
    let cache = Arc::new(cache);
    let blocks = BACKING / 4096;
    // Part of the range the read rows read, cached (RAM and cache device).
    let fill = 32768u64;
    let prefill = |cache: &Cache| {
        for i in 0..fill {
            cache.write(0, i * 4096, &[i as u8; 4096], false).unwrap();
        }
        cache.flush().unwrap();
    };
    // Every row starts from the same state: nothing dirty (writeback is off, so a full
    // ring would otherwise slow the later write rows down), then the read range cached.
    let reset = |cache: &Cache| {
        cache.drain(0, &mut |_| {}).unwrap();
        prefill(cache);
    };
    reset(&cache);

    println!("ring benchmark: 4 KiB random I/O, {ops} commands per row, {WORKERS} I/O workers, files in {}", dir.path().display());
    println!(
        "{:<38} {:>10} {:>10} {:>10}",
        "", "IOPS", "p50 us", "p99 us"
    );

    // Engine only: one thread (as many as the loop thread that serves inline) and
    // WORKERS threads calling the engine back to back.
    let mut engine_iops = HashMap::new();
    for (write, threads) in [(true, 1), (true, WORKERS), (false, 1), (false, WORKERS)] {
        reset(&cache);
        let stop = Arc::new(AtomicBool::new(false));
        let start = Instant::now();
        let per = ops / threads;
        std::thread::scope(|s| {
            for t in 0..threads {
                let cache = cache.clone();
                s.spawn(move || {
                    let mut rng = rand::rngs::SmallRng::seed_from_u64(t as u64);
                    let mut buf = vec![0u8; 4096];
                    for _ in 0..per {
                        let lba = rng.gen_range(0..if write { blocks } else { fill });
                        if write {
                            cache.write(0, lba * 4096, &buf, false).unwrap();
                        } else {
                            cache.read(0, lba * 4096, &mut buf).unwrap();
                        }
                    }
                });
            }
        });
        stop.store(true, Ordering::Relaxed);
        let iops = (per * threads) as f64 / start.elapsed().as_secs_f64();
        engine_iops.insert((write, threads), iops);
        println!(
            "{:<38} {:>10.0}",
            format!(
                "engine only, {} thread{}, {}",
                threads,
                if threads == 1 { "" } else { "s" },
                if write { "write" } else { "read" }
            ),
            iops
        );
    }

    // Modes: every command on a worker; inline (the daemon's default); inline with a
    // 50 µs busy poll.
    let modes = [(false, 0u64), (true, 0), (true, 50)];
    for (write, qd, (inline, poll_us)) in [true, false]
        .into_iter()
        .flat_map(|w| [1usize, 32, 128].map(|q| (w, q)))
        .flat_map(|(w, q)| modes.map(|m| (w, q, m)))
    {
        {
            reset(&cache);
            let mut emu = Emulator::new(
                (8 << 20) - emulator::CMDR_OFF as u32,
                64 << 20,
                FLAG_OOOC | FLAG_READ_LEN,
            );
            let mut el =
                EventLoop::new(WORKERS, slog::Logger::root(slog::Discard, slog::o!())).unwrap();
            let lun = Arc::new(LunState::new(LunConfig::new("bench", 4096, blocks)));
            let mut device = Device::new(
                "bench",
                Ring::new(emu.handler_map()).unwrap(),
                Box::new(emu.doorbell()),
                lun,
                Arc::new(EngineBackend {
                    cache: cache.clone(),
                    dev: 0,
                }),
                slog::Logger::root(slog::Discard, slog::o!()),
            );
            device.set_inline(inline);
            el.add_device(device).unwrap();
            el.set_busy_poll(Duration::from_micros(poll_us));
            let stop = Arc::new(AtomicBool::new(false));
            let s2 = stop.clone();
            let waker = el.waker();
            let th = std::thread::spawn(move || {
                while !s2.load(Ordering::Relaxed) {
                    el.run_once(Some(Duration::from_millis(20))).unwrap();
                }
            });
            let mut rng = rand::rngs::SmallRng::seed_from_u64(qd as u64);
            let data = vec![7u8; 4096];
            let mut started: HashMap<u16, Instant> = HashMap::new();
            let mut lat = Vec::with_capacity(ops);
            let mut submitted = 0;
            let t0 = Instant::now();
            while lat.len() < ops {
                while started.len() < qd && submitted < ops {
                    let lba = rng.gen_range(0..if write { blocks } else { fill });
                    let id = if write {
                        emu.submit(&build16(0x8a, lba, 1, 0), &data, 0)
                    } else {
                        emu.submit(&build16(0x88, lba, 1, 0), &[], 4096)
                    };
                    match id {
                        Some(id) => {
                            started.insert(id, Instant::now());
                            submitted += 1;
                        }
                        None => break,
                    }
                }
                let mut fds = [rustix::event::PollFd::new(
                    emu.kernel_fd(),
                    rustix::event::PollFlags::IN,
                )];
                let _ = rustix::event::poll(
                    &mut fds,
                    Some(&rustix::time::Timespec {
                        tv_sec: 0,
                        tv_nsec: 1_000_000,
                    }),
                );
                for c in emu.reap() {
                    assert_eq!(c.status, 0);
                    if let Some(t) = started.remove(&c.cmd_id) {
                        lat.push(t.elapsed());
                    }
                }
            }
            let iops = ops as f64 / t0.elapsed().as_secs_f64();
            stop.store(true, Ordering::Relaxed);
            let _ = waker.wake();
            th.join().unwrap();
            let p50 = pct(&mut lat, 0.5).as_secs_f64() * 1e6;
            let p99 = pct(&mut lat, 0.99).as_secs_f64() * 1e6;
            let (r1, rn) = (
                iops / engine_iops[&(write, 1)],
                iops / engine_iops[&(write, WORKERS)],
            );
            println!(
                "{:<38} {:>10.0} {:>10.1} {:>10.1}   ({r1:.2} / {rn:.2} of engine only, 1 / {WORKERS} threads)",
                format!(
                    "ring {} QD{qd}, {}",
                    if write { "write" } else { "read" },
                    match (inline, poll_us) {
                        (false, _) => "workers only".to_string(),
                        (true, 0) => "inline".to_string(),
                        (true, p) => format!("inline, poll {p}us"),
                    }
                ),
                iops,
                p50,
                p99,
            );
        }
    }
}
