//! The engine's threads end with the cache: a clean close and a kill (a simulated
//! crash) both leave none of them behind. One test in this file, so no other test's
//! cache runs threads in the process meanwhile.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use lc_cache::{BlockDevice, MemDevice, Tunables};

/// Names of this process's threads that start with `lc-`.
fn engine_threads() -> Vec<String> {
    let mut names = Vec::new();
    for t in std::fs::read_dir("/proc/self/task").unwrap() {
        let comm = t.unwrap().path().join("comm");
        if let Ok(n) = std::fs::read_to_string(comm) {
            if n.starts_with("lc-") {
                names.push(n.trim().to_string());
            }
        }
    }
    names.sort();
    names
}

#[test]
fn close_and_kill_stop_every_engine_thread() {
    let cache = mem_cache(16 << 20, 512, 64 << 10);
    let backing: Arc<dyn BlockDevice> = Arc::new(MemDevice::new(4 << 20));
    for kill in [false, true] {
        let c = open(
            cache.clone(),
            std::slice::from_ref(&backing),
            Tunables::default(),
            4,
        );
        // A new thread names itself once it runs.
        let all = ["lc-append-io", "lc-checkpoint", "lc-flush", "lc-writeback"];
        let t0 = Instant::now();
        while engine_threads() != all && t0.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(engine_threads(), all);
        // An append (a write and a flush) went through lc-append-io.
        c.write(0, 0, &[7u8; 4096], false).unwrap();
        c.flush().unwrap();
        if kill {
            c.kill();
        } else {
            c.close().unwrap();
        }
        assert_eq!(engine_threads(), Vec::<String>::new(), "kill: {kill}");
    }
}
