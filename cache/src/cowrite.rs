//! The co-writer thread (`lc-cowrite`): writes one buffer to the cache device while the
//! thread that handed it over writes another, so two writes are in flight together.
//! An append ([`crate::flush`]) writes its lines and its header copy this way: the
//! device sees both at once and the append waits for one write's time, not two, before
//! its flush. Nothing orders the two writes, as nothing orders any two writes before a
//! flush: a power cut may keep either without the other, and recovery takes a header
//! only when the lines it describes check against its crcs (docs/FORMAT.md).
//!
//! One hand-over at a time: appends are one at a time (the flusher's `caller_io`). A
//! second caller while one is in progress writes its buffer itself.

use std::io;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

use crate::device::{AlignedBuf, BlockDevice};

/// The hand-over between a caller and the co-writer thread.
enum Slot {
    /// Nothing to do.
    Idle,
    /// A buffer to write, and where.
    Job(Arc<dyn BlockDevice>, AlignedBuf, u64),
    /// The thread is writing.
    Busy,
    /// What the write returned; the caller takes it (back to `Idle`).
    Done(io::Result<()>),
    /// The cache is closing: the thread exits.
    Stop,
}

struct Shared {
    slot: Mutex<Slot>,
    cv: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Slot> {
        self.slot.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn wait<'a>(&self, g: MutexGuard<'a, Slot>) -> MutexGuard<'a, Slot> {
        self.cv.wait(g).unwrap_or_else(|e| e.into_inner())
    }
}

/// The co-writer of one cache; its thread stops when this is dropped.
pub(crate) struct CoWriter {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl CoWriter {
    /// Starts the thread. Without one (the spawn failed), every write is the caller's.
    pub(crate) fn new() -> CoWriter {
        let shared = Arc::new(Shared {
            slot: Mutex::new(Slot::Idle),
            cv: Condvar::new(),
        });
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name("lc-cowrite".into())
            .spawn(move || run(&s))
            .ok();
        CoWriter { shared, thread }
    }

    /// Writes `buf` at `offset` of `dev` on the co-writer thread while `here` runs on
    /// this one; returns once both are done, with both results.
    pub(crate) fn write_beside<R>(
        &self,
        dev: &Arc<dyn BlockDevice>,
        buf: AlignedBuf,
        offset: u64,
        here: impl FnOnce() -> R,
    ) -> (R, io::Result<()>) {
        let mut g = self.shared.lock();
        if self.thread.is_none() || !matches!(*g, Slot::Idle) {
            drop(g);
            let r = here();
            return (r, dev.write_at(&buf, offset));
        }
        *g = Slot::Job(dev.clone(), buf, offset);
        drop(g);
        self.shared.cv.notify_all();
        let r = here();
        let mut g = self.shared.lock();
        loop {
            match std::mem::replace(&mut *g, Slot::Idle) {
                Slot::Done(w) => return (r, w),
                other => *g = other,
            }
            g = self.shared.wait(g);
        }
    }
}

impl Drop for CoWriter {
    fn drop(&mut self) {
        *self.shared.lock() = Slot::Stop;
        self.shared.cv.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Body of the co-writer thread.
fn run(shared: &Shared) {
    let mut g = shared.lock();
    loop {
        match std::mem::replace(&mut *g, Slot::Busy) {
            Slot::Job(dev, buf, offset) => {
                drop(g);
                let r = dev.write_at(&buf, offset);
                drop((dev, buf));
                g = shared.lock();
                *g = Slot::Done(r);
                shared.cv.notify_all();
            }
            Slot::Stop => return,
            other => {
                *g = other;
                g = shared.wait(g);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::MemDevice;

    #[test]
    fn both_writes_land_and_the_callers_result_comes_back() {
        let dev = Arc::new(MemDevice::new(1 << 20));
        let d: Arc<dyn BlockDevice> = dev.clone();
        let cw = CoWriter::new();
        for round in 0..100u64 {
            let mut a = AlignedBuf::new(4096);
            a.fill(round as u8);
            let mut b = AlignedBuf::new(4096);
            b.fill(!round as u8);
            let (r, w) = cw.write_beside(&d, b, 8192, || d.write_at(&a, 0).map(|_| round));
            assert_eq!(r.unwrap(), round);
            w.unwrap();
            let mut got = vec![0u8; 4096];
            d.read_at(&mut got, 8192).unwrap();
            assert!(got.iter().all(|&x| x == !round as u8));
            d.read_at(&mut got, 0).unwrap();
            assert!(got.iter().all(|&x| x == round as u8));
        }
    }

    #[test]
    fn a_failed_write_is_reported() {
        let d: Arc<dyn BlockDevice> = Arc::new(MemDevice::new(8192));
        let cw = CoWriter::new();
        // Beyond the end of the device.
        let (_, w) = cw.write_beside(&d, AlignedBuf::new(4096), 1 << 20, || ());
        assert!(w.is_err());
        // The thread goes on serving.
        let (_, w) = cw.write_beside(&d, AlignedBuf::new(4096), 0, || ());
        w.unwrap();
    }
}
