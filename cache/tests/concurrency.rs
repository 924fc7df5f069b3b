//! Several threads issue I/O while the flusher and writeback run; each thread owns a
//! region so its reads can be checked exactly, and a control thread flushes, drains,
//! seals and changes tunables meanwhile. At the end everything reads back, and after a
//! drain the backing devices alone hold it.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use common::*;
use lc_cache::{BlockDevice, MemDevice, Tunables};
use rand::Rng;

#[test]
fn concurrent_io_with_background_flush_and_writeback() {
    let base = seed("concurrency");
    let threads = 4u64;
    let region = 64 * 4096u64;
    let seg = 64 << 10;
    for case in 0..cases(8) as u64 {
        let seed = base.wrapping_add(case);
        let cache = mem_cache(seg * 10, 512, seg as u32);
        let devs: Vec<Arc<dyn BlockDevice>> = (0..2)
            .map(|_| Arc::new(MemDevice::new(region * threads)) as Arc<dyn BlockDevice>)
            .collect();
        let t = Tunables {
            writeback_threshold: 20,
            barrier_deadline_ms: 1,
            ..Tunables::default()
        };
        let c = Arc::new(open(cache, &devs, t, 3));
        let stop = Arc::new(AtomicBool::new(false));
        let control = {
            let (c, stop) = (c.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut rng = rng(seed ^ 0xfeed);
                while !stop.load(Ordering::Relaxed) {
                    match rng.gen_range(0..4) {
                        0 => c.flush().unwrap(),
                        1 => c.seal_now().unwrap(),
                        2 => c
                            .set_tunable("writeback_threshold", &rng.gen_range(0..80).to_string())
                            .unwrap(),
                        _ => c.commit_superblock().unwrap(),
                    }
                    std::thread::sleep(std::time::Duration::from_millis(2));
                }
            })
        };
        let workers: Vec<_> = (0..threads)
            .map(|t| {
                let c = c.clone();
                std::thread::spawn(move || {
                    let mut rng = rng(seed.wrapping_add(t * 7919));
                    let mut model = vec![vec![0u8; region as usize]; 2];
                    let base_off = t * region;
                    for step in 0..1500 {
                        let dev = rng.gen_range(0..2usize);
                        let n = rng.gen_range(1..=16u64) * 512;
                        let off = rng.gen_range(0..(region - n) / 512) * 512;
                        let r = off as usize..(off + n) as usize;
                        match rng.gen_range(0..10) {
                            0..=4 => {
                                let data: Vec<u8> = (0..n).map(|_| rng.gen()).collect();
                                let at = base_off + off;
                                // The daemon's non-blocking path first, half the time.
                                match rng.gen_bool(0.5).then(|| c.try_write(dev as u8, at, &data)) {
                                    Some(Some(r)) => r.unwrap(),
                                    _ => c.write(dev as u8, at, &data, rng.gen_bool(0.05)).unwrap(),
                                }
                                model[dev][r].copy_from_slice(&data);
                            }
                            5..=8 => {
                                let mut buf = vec![0u8; n as usize];
                                let at = base_off + off;
                                match rng
                                    .gen_bool(0.5)
                                    .then(|| c.try_read(dev as u8, at, &mut buf))
                                {
                                    Some(Some(r)) => r.unwrap(),
                                    _ => c.read(dev as u8, at, &mut buf).unwrap(),
                                }
                                assert!(
                                    buf == model[dev][r],
                                    "seed {seed} thread {t} step {step}: read mismatch"
                                );
                            }
                            _ => {
                                c.discard(dev as u8, base_off + off, n).unwrap();
                                model[dev][r].fill(0);
                            }
                        }
                    }
                    model
                })
            })
            .collect();
        let models: Vec<Vec<Vec<u8>>> = workers.into_iter().map(|w| w.join().unwrap()).collect();
        stop.store(true, Ordering::Relaxed);
        control.join().unwrap();
        for dev in 0..2u8 {
            c.drain(dev, &mut |_| {}).unwrap();
        }
        let c = Arc::try_unwrap(c).ok().expect("sole owner");
        c.close().unwrap();
        for (t, model) in models.iter().enumerate() {
            for dev in 0..2 {
                let mut buf = vec![0u8; region as usize];
                devs[dev].read_at(&mut buf, t as u64 * region).unwrap();
                assert!(
                    buf == model[dev],
                    "seed {seed}: backing {dev} region {t} after drain"
                );
            }
        }
    }
}
