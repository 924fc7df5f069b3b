//! `lc-append-io`: a second thread for one cache-device write at a time, so that an
//! append (`flush.rs`) has its new lines written while its own thread computes their
//! checksums, encodes the header that needs them and writes it: the two writes overlap,
//! and the checksums overlap a write instead of preceding both (DESIGN.md "Appends").
//!
//! One write at a time: appends are serial (the flusher's, or one caller's while
//! `caller_io` holds the log). [`SideWriter::post`] writes on the calling thread instead
//! when the thread is not running (before it starts, after [`SideWriter::stop`]) or is
//! busy, so a write is never lost or left waiting for a thread that is gone.

use std::io;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};

use crate::device::{AlignedBuf, BlockDevice};

/// A buffer shared with the thread while it writes it (the caller reads it meanwhile).
pub(crate) type Shared = Arc<AlignedBuf>;

#[derive(Default)]
struct Slot {
    running: bool,
    stop: bool,
    job: Option<(Shared, u64)>,
    busy: bool,
    done: Option<io::Result<()>>,
}

/// The handle appends post to (in `Inner`).
#[derive(Default)]
pub(crate) struct SideWriter {
    slot: Mutex<Slot>,
    cv: Condvar,
}

/// A write handed out by [`SideWriter::post`]: [`SideWriter::wait`] returns its result.
#[must_use]
pub(crate) enum Posted {
    /// Written on the caller's thread already.
    Inline(io::Result<()>),
    /// Being written by the thread.
    Side,
}

impl SideWriter {
    fn lock(&self) -> MutexGuard<'_, Slot> {
        self.slot.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Body of the thread: writes what is posted to `dev` until stopped.
    pub(crate) fn run(&self, dev: &dyn BlockDevice) {
        let mut s = self.lock();
        s.running = true;
        loop {
            if let Some((buf, off)) = s.job.take() {
                s.busy = true;
                drop(s);
                let r = dev.write_at(&buf, off);
                drop(buf);
                s = self.lock();
                s.busy = false;
                s.done = Some(r);
                self.cv.notify_all();
                continue;
            }
            if s.stop {
                s.running = false;
                self.cv.notify_all();
                return;
            }
            s = self.cv.wait(s).unwrap_or_else(PoisonError::into_inner);
        }
    }

    /// Writes `buf` at `off` of `dev` (the device the thread writes): on the thread when
    /// it is free, else here and now.
    pub(crate) fn post(&self, dev: &dyn BlockDevice, buf: Shared, off: u64) -> Posted {
        let mut s = self.lock();
        if s.running && !s.stop && s.job.is_none() && !s.busy && s.done.is_none() {
            s.job = Some((buf, off));
            self.cv.notify_all();
            return Posted::Side;
        }
        drop(s);
        Posted::Inline(dev.write_at(&buf, off))
    }

    /// Waits for a posted write to complete; returns its result.
    pub(crate) fn wait(&self, p: Posted) -> io::Result<()> {
        if let Posted::Inline(r) = p {
            return r;
        }
        let mut s = self.lock();
        loop {
            if let Some(r) = s.done.take() {
                return r;
            }
            s = self.cv.wait(s).unwrap_or_else(PoisonError::into_inner);
        }
    }

    /// Stops the thread once it has written what was posted to it.
    pub(crate) fn stop(&self) {
        self.lock().stop = true;
        self.cv.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::MemDevice;

    fn buf(byte: u8) -> Shared {
        let mut b = AlignedBuf::new(4096);
        b.fill(byte);
        Arc::new(b)
    }

    #[test]
    fn writes_on_the_thread_while_it_runs_and_here_before_and_after() {
        let dev: Arc<dyn BlockDevice> = Arc::new(MemDevice::new(1 << 20));
        let w = Arc::new(SideWriter::default());
        // Not started: written on this thread.
        let p = w.post(&*dev, buf(1), 0);
        assert!(matches!(p, Posted::Inline(Ok(()))));
        w.wait(p).unwrap();
        let t = {
            let (w, dev) = (w.clone(), dev.clone());
            std::thread::spawn(move || w.run(&*dev))
        };
        while !w.lock().running {
            std::thread::yield_now();
        }
        for i in 0..50u8 {
            let p = w.post(&*dev, buf(i), 4096 * (1 + i as u64));
            assert!(matches!(p, Posted::Side));
            w.wait(p).unwrap();
        }
        w.stop();
        t.join().unwrap();
        let p = w.post(&*dev, buf(9), 8192);
        assert!(matches!(p, Posted::Inline(Ok(()))));
        let mut b = vec![0u8; 4096 * 51];
        dev.read_at(&mut b, 0).unwrap();
        assert!(b[..4096].iter().all(|&x| x == 1));
        assert!(b[8192..12288].iter().all(|&x| x == 9));
        assert!(b[4096 * 50..].iter().all(|&x| x == 49));
    }

    #[test]
    fn a_second_post_while_one_is_out_is_written_inline() {
        let dev: Arc<dyn BlockDevice> = Arc::new(MemDevice::new(1 << 20));
        let w = Arc::new(SideWriter::default());
        w.lock().running = true; // no thread: the first post stays out
        let p1 = w.post(&*dev, buf(3), 0);
        assert!(matches!(p1, Posted::Side));
        let p2 = w.post(&*dev, buf(4), 4096);
        assert!(matches!(p2, Posted::Inline(Ok(()))));
        let t = {
            let (w, dev) = (w.clone(), dev.clone());
            std::thread::spawn(move || w.run(&*dev))
        };
        w.wait(p1).unwrap();
        w.stop();
        t.join().unwrap();
        let mut b = vec![0u8; 8192];
        dev.read_at(&mut b, 0).unwrap();
        assert!(b[..4096].iter().all(|&x| x == 3));
        assert!(b[4096..].iter().all(|&x| x == 4));
    }
}
