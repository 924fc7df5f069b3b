//! The daemon's mio event loop: every device's doorbell fd, the worker results (through
//! a `mio::Waker`), and any extra sources the daemon registers (netlink, control
//! socket, signals), whose readiness is handed back to the caller. Blocking I/O never
//! runs here: commands that touch the backend go to the [`WorkerPool`].

use std::collections::HashMap;
use std::io;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token, Waker};
use slog::{info, Logger};

use crate::device::{Device, Done, WorkerPool};

const WAKER: Token = Token(0);
/// Tokens from here on are devices; below are extra sources.
const FIRST_DEVICE: usize = 1 << 16;

/// The event loop.
pub struct EventLoop {
    poll: Poll,
    waker: Arc<Waker>,
    devices: HashMap<usize, Device>,
    done_rx: Receiver<Done>,
    pool: WorkerPool,
    next_device: usize,
    next_source: usize,
    events: Events,
    woken: Arc<AtomicBool>,
    busy_poll: Duration,
    log: Logger,
}

/// The longest one [`EventLoop::run_once`] busy-polls before it looks at its other
/// sources again.
const MAX_SPIN: Duration = Duration::from_millis(10);

impl EventLoop {
    /// A loop with `workers` I/O threads.
    pub fn new(workers: usize, log: Logger) -> io::Result<EventLoop> {
        let poll = Poll::new()?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
        let (done_tx, done_rx) = channel();
        let w = waker.clone();
        // One wake-up covers every result queued before the loop drains the channel.
        let woken = Arc::new(AtomicBool::new(false));
        let flag = woken.clone();
        let pool = WorkerPool::new(
            workers,
            done_tx,
            Arc::new(move || {
                if !flag.swap(true, Ordering::AcqRel) {
                    let _ = w.wake();
                }
            }),
        );
        Ok(EventLoop {
            poll,
            waker,
            devices: HashMap::new(),
            done_rx,
            pool,
            next_device: FIRST_DEVICE,
            next_source: 1,
            events: Events::with_capacity(256),
            woken,
            busy_poll: Duration::ZERO,
            log,
        })
    }

    /// After serving, keep polling the rings (shared-memory loads, no sleeping) until
    /// they have been idle for `d`: a command that arrives meanwhile is fetched without
    /// a wake-up of this thread. Zero (the default) sleeps in `epoll_wait` at once.
    pub fn set_busy_poll(&mut self, d: Duration) {
        self.busy_poll = d;
    }

    /// A handle that wakes the loop from another thread.
    pub fn waker(&self) -> Arc<Waker> {
        self.waker.clone()
    }

    /// Serves a device; returns its id. Entries already on the ring are fetched at once
    /// (no event is raised for entries queued before the fd was opened).
    pub fn add_device(&mut self, mut dev: Device) -> io::Result<usize> {
        let id = self.next_device;
        self.next_device += 1;
        let fd = dev.fd();
        self.poll
            .registry()
            .register(&mut SourceFd(&fd), Token(id), Interest::READABLE)?;
        dev.on_readable(id, &self.pool);
        self.devices.insert(id, dev);
        Ok(id)
    }

    /// Stops serving a device and returns it (after its in-flight commands are done).
    pub fn remove_device(&mut self, id: usize) -> Option<Device> {
        while self.devices.get(&id).is_some_and(|d| d.busy() > 0) {
            match self.done_rx.recv_timeout(Duration::from_secs(1)) {
                Ok(done) => self.deliver(done),
                Err(_) => break,
            }
        }
        let dev = self.devices.remove(&id)?;
        let fd = dev.fd();
        let _ = self.poll.registry().deregister(&mut SourceFd(&fd));
        info!(self.log, "device detached"; "device" => &dev.name);
        Some(dev)
    }

    /// The device with id `id`.
    pub fn device(&self, id: usize) -> Option<&Device> {
        self.devices.get(&id)
    }

    /// Ids of the served devices.
    pub fn device_ids(&self) -> Vec<usize> {
        self.devices.keys().copied().collect()
    }

    /// Registers an extra readable fd; its token is returned by [`EventLoop::run_once`]
    /// when ready.
    pub fn add_source(&mut self, fd: RawFd) -> io::Result<usize> {
        let t = self.next_source;
        self.next_source += 1;
        assert!(t < FIRST_DEVICE, "too many sources");
        self.poll
            .registry()
            .register(&mut SourceFd(&fd), Token(t), Interest::READABLE)?;
        Ok(t)
    }

    /// Removes an extra source.
    pub fn remove_source(&mut self, fd: RawFd) {
        let _ = self.poll.registry().deregister(&mut SourceFd(&fd));
    }

    fn deliver(&mut self, done: Done) {
        if let Some(d) = self.devices.get_mut(&done.device) {
            d.on_done(done);
        }
    }

    /// Waits up to `timeout` for events, serves devices and completions; returns the
    /// extra-source tokens that became readable.
    pub fn run_once(&mut self, timeout: Option<Duration>) -> io::Result<Vec<usize>> {
        match self.poll.poll(&mut self.events, timeout) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return Ok(Vec::new()),
            Err(e) => return Err(e),
        }
        let mut ready = Vec::new();
        let mut devs = Vec::new();
        for ev in self.events.iter() {
            match ev.token() {
                WAKER => {}
                Token(t) if t >= FIRST_DEVICE => devs.push(t),
                Token(t) => ready.push(t),
            }
        }
        for id in devs {
            if let Some(d) = self.devices.get_mut(&id) {
                d.on_readable(id, &self.pool);
            }
        }
        self.complete_done();
        if !self.busy_poll.is_zero() && !self.devices.is_empty() {
            self.spin();
        }
        Ok(ready)
    }

    /// Completions from the workers: complete them all, then one kick per device.
    /// Returns whether there were any.
    fn complete_done(&mut self) -> bool {
        // Clear the wake flag before draining so a result sent after the drain wakes us.
        self.woken.store(false, Ordering::Release);
        let mut touched = Vec::new();
        while let Ok(done) = self.done_rx.try_recv() {
            touched.push(done.device);
            self.deliver(done);
        }
        touched.sort_unstable();
        touched.dedup();
        let any = !touched.is_empty();
        for id in touched {
            if let Some(d) = self.devices.get_mut(&id) {
                d.after_completions(id, &self.pool);
            }
        }
        any
    }

    /// The busy poll of [`EventLoop::set_busy_poll`].
    fn spin(&mut self) {
        let start = Instant::now();
        let mut last_work = start;
        loop {
            let mut any = false;
            for (&id, d) in self.devices.iter_mut() {
                if d.pending() {
                    d.serve(id, &self.pool);
                    any = true;
                }
            }
            any |= self.complete_done();
            let now = Instant::now();
            if any {
                last_work = now;
            } else if now - last_work >= self.busy_poll || now - start >= MAX_SPIN {
                return;
            }
            std::hint::spin_loop();
        }
    }
}
