//! Ring benchmark: 4 KiB random writes and reads through the TCMU ring emulator, the
//! event loop, the I/O workers and the engine, at queue depths 1, 32 and 128, with
//! IOPS and p50/p99 latency, beside engine-only figures of the same run. Each row runs
//! three times: every command on a worker ("workers only"), with the non-blocking
//! commands served on the loop thread ("inline", the daemon's default), and inline with
//! the loop busy-polling the ring for 50 µs before it sleeps (`busy_poll_us`).
//!
//! Then large commands at QD 4 (MiB/s), the rows where copies of the data, not
//! per-command overhead, decide the speed: 1 MiB sequential writes and reads over the
//! cached range (reads hit RAM and the cache device), and 512 KiB writes and reads of
//! one range that stays in the open segment ("hot": overwrites in place and RAM hits,
//! no device I/O, so what is left is the data path's copies). `LC_BENCH_ONLY=large`
//! runs only those, each beside the engine alone on the same shape, with the process's
//! CPU time per command (every thread, the emulated kernel's copies included: steadier
//! than wall-clock figures on a shared machine).
//!
//! Run: `cargo bench --bench ring` (env `LC_BENCH_OPS`, default 20000 per 4 KiB row;
//! `LC_BENCH_LARGE_OPS`, default 512 per large row).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use lc::device::{Device, EngineBackend};
use lc::emulator::{self, Emulator, FLAG_OOOC, FLAG_READ_LEN};
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
/// What the commands of a row look like.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
enum Shape {
    /// 4 KiB at a random block.
    Small,
    /// 1 MiB, walking the cached range in order.
    Seq,
    /// 512 KiB, always at offset 0 (in the open segment after the first write).
    Hot,
}

impl Shape {
    fn size(self) -> usize {
        match self {
            Shape::Small => 4096,
            Shape::Seq => 1 << 20,
            Shape::Hot => 512 << 10,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Shape::Small => "4KiB",
            Shape::Seq => "1MiB seq",
            Shape::Hot => "512KiB hot",
        }
    }
}

/// CPU time of the whole process (every thread: the loop, the workers, the engine's
/// threads and the emulated kernel), which noise from other work on the machine does
/// not inflate the way it does wall-clock figures.
fn cpu_time() -> Duration {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ProcessCPUTime);
    Duration::new(t.tv_sec as u64, t.tv_nsec as u32)
}

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
        "{:<44} {:>10} {:>10} {:>10}",
        "", "IOPS", "p50 us", "p99 us"
    );

    // Engine only: one thread (as many as the loop thread that serves inline) and
    // WORKERS threads calling the engine back to back.
    let large_only = std::env::var("LC_BENCH_ONLY").as_deref() == Ok("large");
    let mut engine_iops = HashMap::new();
    for (write, threads) in [(true, 1), (true, WORKERS), (false, 1), (false, WORKERS)]
        .into_iter()
        .filter(|_| !large_only)
    {
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
            "{:<44} {:>10.0}",
            format!(
                "engine only, {} thread{}, {}",
                threads,
                if threads == 1 { "" } else { "s" },
                if write { "write" } else { "read" }
            ),
            iops
        );
    }

    // Engine only, the large shapes, one thread.
    let large_ops: usize = std::env::var("LC_BENCH_LARGE_OPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(512);
    let mut engine_mib = HashMap::new();
    for (shape, write) in [Shape::Seq, Shape::Hot]
        .into_iter()
        .flat_map(|s| [(s, true), (s, false)])
    {
        reset(&cache);
        let size = shape.size();
        let mut buf = vec![7u8; size];
        if shape == Shape::Hot {
            cache.write(0, 0, &buf, false).unwrap();
        }
        let per = (size / 4096) as u64;
        let start = Instant::now();
        let cpu0 = cpu_time();
        for i in 0..large_ops as u64 {
            let lba = if shape == Shape::Hot {
                0
            } else {
                (i * per) % fill
            };
            if write {
                cache.write(0, lba * 4096, &buf, false).unwrap();
            } else {
                cache.read(0, lba * 4096, &mut buf).unwrap();
            }
        }
        let iops = large_ops as f64 / start.elapsed().as_secs_f64();
        let cpu = (cpu_time() - cpu0).as_secs_f64() * 1e6 / large_ops as f64;
        let mib = iops * size as f64 / (1 << 20) as f64;
        engine_mib.insert((shape, write), mib);
        println!(
            "{:<44} {:>10.0} {:>10} {:>10}   ({mib:.0} MiB/s, {cpu:.0} us CPU per command)",
            format!(
                "engine only, 1 thread, {} {}",
                shape.name(),
                if write { "write" } else { "read" }
            ),
            iops,
            "",
            ""
        );
    }

    // Modes: every command on a worker; inline (the daemon's default); inline with a
    // 50 µs busy poll.
    let modes = [(false, 0u64), (true, 0), (true, 50)];
    let small_rows = [true, false]
        .into_iter()
        .flat_map(|w| [1usize, 32, 128].map(|q| (w, q, Shape::Small)))
        .filter(|_| !large_only);
    let large_rows = [Shape::Seq, Shape::Hot]
        .into_iter()
        .flat_map(|s| [(true, 4usize, s), (false, 4, s)]);
    for (write, qd, shape, (inline, poll_us)) in small_rows
        .chain(large_rows)
        .flat_map(|(w, q, sh)| modes.map(|m| (w, q, sh, m)))
    {
        let size = shape.size();
        let ops = if shape == Shape::Small {
            ops
        } else {
            large_ops
        };
        {
            reset(&cache);
            if shape == Shape::Hot {
                cache.write(0, 0, &vec![7u8; size], false).unwrap();
            }
            // A shared mapping, as a real device's memory.
            let mut emu = Emulator::new_mapped(
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
            let data = vec![7u8; size];
            let per_cmd = (size / 4096) as u64;
            let mut next_lba = 0u64;
            let mut pick = |rng: &mut rand::rngs::SmallRng| match shape {
                Shape::Small => rng.gen_range(0..if write { blocks } else { fill }),
                Shape::Seq => {
                    let lba = next_lba;
                    next_lba = (next_lba + per_cmd) % fill;
                    lba
                }
                Shape::Hot => 0,
            };
            let mut started: HashMap<u16, Instant> = HashMap::new();
            let mut lat = Vec::with_capacity(ops);
            let mut submitted = 0;
            let t0 = Instant::now();
            let cpu0 = cpu_time();
            while lat.len() < ops {
                while started.len() < qd && submitted < ops {
                    let lba = pick(&mut rng);
                    let n = per_cmd as u32;
                    let id = if write {
                        emu.submit(&build16(0x8a, lba, n, 0), &data, 0)
                    } else {
                        emu.submit(&build16(0x88, lba, n, 0), &[], size)
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
            let cpu = (cpu_time() - cpu0).as_secs_f64() * 1e6 / ops as f64;
            stop.store(true, Ordering::Relaxed);
            let _ = waker.wake();
            th.join().unwrap();
            let p50 = pct(&mut lat, 0.5).as_secs_f64() * 1e6;
            let p99 = pct(&mut lat, 0.99).as_secs_f64() * 1e6;
            let mode = match (inline, poll_us) {
                (false, _) => "workers only".to_string(),
                (true, 0) => "inline".to_string(),
                (true, p) => format!("inline, poll {p}us"),
            };
            let rw = if write { "write" } else { "read" };
            if shape != Shape::Small {
                let mib = iops * size as f64 / (1 << 20) as f64;
                let engine = engine_mib[&(shape, write)];
                println!(
                    "{:<44} {:>10.0} {:>10.1} {:>10.1}   ({mib:.0} MiB/s, {cpu:.0} us CPU per command; {:.2} of engine only, 1 thread)",
                    format!("ring {} {rw} QD{qd}, {mode}", shape.name()),
                    iops,
                    p50,
                    p99,
                    mib / engine,
                );
                continue;
            }
            let (r1, rn) = (
                iops / engine_iops[&(write, 1)],
                iops / engine_iops[&(write, WORKERS)],
            );
            println!(
                "{:<44} {:>10.0} {:>10.1} {:>10.1}   ({r1:.2} / {rn:.2} of engine only, 1 / {WORKERS} threads)",
                format!("ring {rw} QD{qd}, {mode}"),
                iops,
                p50,
                p99,
            );
        }
    }
}
