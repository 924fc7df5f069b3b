//! The daemon's mio event loop: every device's doorbell fd, the worker results (through
//! a `mio::Waker`), the completions of its io_uring, and any extra sources the daemon
//! registers (netlink, control socket, signals), whose readiness is handed back to the
//! caller. Blocking I/O never runs here: READs of data on the cache device are queued
//! on the loop's io_uring (docs/DESIGN.md "Reads through io_uring"), every other
//! command that touches the backend goes to the device's own [`Workers`].
//!
//! Stopping a device (removal) or all of them (daemon stop) waits, with a bound, for
//! every command on its workers or its io_uring, completes them and publishes the tail;
//! the loop keeps serving the other devices meanwhile.

use std::collections::HashMap;
use std::io;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token, Waker};
use slog::{info, warn, Logger};

use crate::device::{Device, Done, Reads, Workers};
use crate::workers::Notify;

/// Idle rounds of the busy poll between two reads of the clock.
const SPIN_CLOCK_EVERY: u32 = 16;
const WAKER: Token = Token(0);
/// Tokens from here on are devices; below are extra sources.
const FIRST_DEVICE: usize = 1 << 16;
/// The io_uring of cache-device reads.
const READS: Token = Token(FIRST_DEVICE - 1);
/// Reads the io_uring holds at once (more wait for room on the workers' path).
const READS_DEPTH: u32 = 256;

/// How long stopping a device waits for the commands on its workers, by default.
pub const STOP_BOUND: Duration = Duration::from_secs(30);
/// How long a command may wait for a worker of its device, by default (below the
/// kernel's default `cmd_time_out` of 30 s, so the initiator hears from us first).
pub const QUEUE_DEADLINE: Duration = Duration::from_secs(20);
/// How often queued commands are checked against the deadline.
const EXPIRY_TICK: Duration = Duration::from_millis(100);

/// The event loop.
pub struct EventLoop {
    poll: Poll,
    waker: Arc<Waker>,
    devices: HashMap<usize, Device>,
    done_tx: Sender<Done>,
    done_rx: Receiver<Done>,
    notify: Notify,
    io_threads: usize,
    next_device: usize,
    next_source: usize,
    events: Events,
    woken: Arc<AtomicBool>,
    busy_poll: Duration,
    stop_bound: Duration,
    queue_deadline: Duration,
    last_expiry: Instant,
    /// Cache-device reads through io_uring ([`EventLoop::enable_io_uring`]).
    reads: Option<Reads>,
    /// Extra-source tokens seen while stopping a device, returned by the next
    /// [`EventLoop::run_once`].
    deferred: Vec<usize>,
    log: Logger,
}

/// The longest one [`EventLoop::run_once`] busy-polls before it looks at its other
/// sources again.
const MAX_SPIN: Duration = Duration::from_millis(10);

impl EventLoop {
    /// A loop whose devices get up to `io_threads` I/O workers each.
    pub fn new(io_threads: usize, log: Logger) -> io::Result<EventLoop> {
        let poll = Poll::new()?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
        let (done_tx, done_rx) = channel();
        let w = waker.clone();
        // One wake-up covers every result queued before the loop drains the channel.
        let woken = Arc::new(AtomicBool::new(false));
        let flag = woken.clone();
        let notify: Notify = Arc::new(move || {
            if !flag.swap(true, Ordering::AcqRel) {
                let _ = w.wake();
            }
        });
        Ok(EventLoop {
            poll,
            waker,
            devices: HashMap::new(),
            done_tx,
            done_rx,
            notify,
            io_threads: io_threads.max(1),
            next_device: FIRST_DEVICE,
            next_source: 1,
            events: Events::with_capacity(256),
            woken,
            busy_poll: Duration::ZERO,
            stop_bound: STOP_BOUND,
            queue_deadline: QUEUE_DEADLINE,
            last_expiry: Instant::now(),
            reads: None,
            deferred: Vec::new(),
            log,
        })
    }

    /// After serving, keep polling the rings (shared-memory loads, no sleeping) until
    /// they have been idle for `d`: a command that arrives meanwhile is fetched without
    /// a wake-up of this thread. Zero (the default) sleeps in `epoll_wait` at once.
    pub fn set_busy_poll(&mut self, d: Duration) {
        self.busy_poll = d;
    }

    /// Reads of cached data go through an io_uring of this loop (`[daemon] io_uring`)
    /// where the kernel allows it; otherwise (logged) they stay on the workers.
    pub fn enable_io_uring(&mut self) {
        if self.reads.is_some() {
            return;
        }
        match Reads::new(READS_DEPTH) {
            Ok(r) => {
                let fd = r.fd();
                match self
                    .poll
                    .registry()
                    .register(&mut SourceFd(&fd), READS, Interest::READABLE)
                {
                    Ok(()) => {
                        info!(self.log, "reads of cached data through io_uring"; "depth" => READS_DEPTH);
                        self.reads = Some(r);
                    }
                    Err(e) => {
                        warn!(self.log, "io_uring not pollable; reads stay on the I/O workers"; "error" => %e)
                    }
                }
            }
            Err(e) => {
                warn!(self.log, "io_uring unavailable; reads stay on the I/O workers"; "error" => %e)
            }
        }
    }

    /// Whether reads go through io_uring.
    pub fn io_uring(&self) -> bool {
        self.reads.is_some()
    }

    /// How long stopping a device waits for its commands ([`STOP_BOUND`]).
    pub fn set_stop_bound(&mut self, d: Duration) {
        self.stop_bound = d;
    }

    /// How long a command may wait for a worker ([`QUEUE_DEADLINE`]).
    pub fn set_queue_deadline(&mut self, d: Duration) {
        self.queue_deadline = d;
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
        dev.set_workers(Workers::new(
            // Thread names hold 15 bytes: "lc-io-999.999" at most.
            &format!("lc-io-{}", (id - FIRST_DEVICE) % 1000),
            self.io_threads,
            self.done_tx.clone(),
            self.notify.clone(),
        ));
        dev.on_readable(id, self.reads.as_mut());
        self.devices.insert(id, dev);
        self.submit_reads();
        Ok(id)
    }

    /// Stops serving a device and returns it: nothing new is fetched, the commands on
    /// its workers are waited for (up to the stop bound, serving the other devices
    /// meanwhile), completed and published, and its workers stopped.
    pub fn remove_device(&mut self, id: usize) -> Option<Device> {
        self.devices.get_mut(&id)?.begin_stop();
        self.drain(&[id]);
        let dev = self.devices.remove(&id)?;
        Some(self.detach(dev))
    }

    /// Stops every device as [`EventLoop::remove_device`] does, all at once (daemon
    /// stop): when this returns, every command that finished is completed on its ring
    /// and every worker thread has exited (or is reported stuck in the log).
    pub fn shutdown(&mut self) -> Vec<Device> {
        let ids = self.device_ids();
        for d in self.devices.values_mut() {
            d.begin_stop();
        }
        self.drain(&ids);
        let devs: Vec<Device> = ids
            .iter()
            .filter_map(|id| self.devices.remove(id))
            .collect();
        devs.into_iter().map(|d| self.detach(d)).collect()
    }

    /// Runs the loop until the devices `ids` have no command on a worker, or the stop
    /// bound passes (then the commands still running are logged).
    fn drain(&mut self, ids: &[usize]) {
        let deadline = Instant::now() + self.stop_bound;
        loop {
            let busy = ids
                .iter()
                .any(|id| self.devices.get(id).is_some_and(|d| d.busy() > 0));
            let left = deadline.saturating_duration_since(Instant::now());
            if !busy || left.is_zero() {
                break;
            }
            if let Err(e) = self.poll_once(Some(left.min(Duration::from_millis(50)))) {
                warn!(self.log, "event loop failed while stopping devices"; "error" => %e);
                break;
            }
        }
        for id in ids {
            if let Some(d) = self.devices.get_mut(id) {
                d.publish();
                if d.busy() > 0 {
                    warn!(self.log, "stopping device: commands still running after the bound, left unanswered";
                          "device" => &d.name, "bound_s" => self.stop_bound.as_secs_f64(),
                          "running" => format!("{:?}", d.running()), "unanswered" => d.busy());
                }
            }
        }
    }

    fn detach(&mut self, mut dev: Device) -> Device {
        let fd = dev.fd();
        let _ = self.poll.registry().deregister(&mut SourceFd(&fd));
        // Drained: the workers are idle unless some command is stuck.
        let bound = if dev.busy() == 0 {
            Duration::from_secs(5)
        } else {
            Duration::ZERO
        };
        if let Err(running) = dev.stop_workers(bound) {
            warn!(self.log, "worker threads of a stopped device are still running"; "device" => &dev.name,
                  "running" => format!("{running:?}"));
        }
        info!(self.log, "device detached"; "device" => &dev.name);
        dev
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
        assert!(t < READS.0, "too many sources");
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
        let timeout = if self.deferred.is_empty() {
            timeout
        } else {
            Some(Duration::ZERO)
        };
        self.poll_once(timeout)?;
        Ok(std::mem::take(&mut self.deferred))
    }

    /// One round: poll, serve, complete; extra-source tokens go to `deferred`.
    fn poll_once(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        // Wake up in time to apply the per-command deadline.
        let timeout = Some(timeout.map_or(EXPIRY_TICK, |t| t.min(EXPIRY_TICK)));
        match self.poll.poll(&mut self.events, timeout) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return Ok(()),
            Err(e) => return Err(e),
        }
        let mut devs = Vec::new();
        for ev in self.events.iter() {
            match ev.token() {
                WAKER | READS => {}
                Token(t) if t >= FIRST_DEVICE => devs.push(t),
                Token(t) => {
                    if !self.deferred.contains(&t) {
                        self.deferred.push(t);
                    }
                }
            }
        }
        for id in devs {
            if let Some(d) = self.devices.get_mut(&id) {
                d.on_readable(id, self.reads.as_mut());
            }
        }
        self.submit_reads();
        self.complete_reads();
        self.complete_done();
        if self.last_expiry.elapsed() >= EXPIRY_TICK {
            self.last_expiry = Instant::now();
            for d in self.devices.values_mut() {
                d.expire(self.queue_deadline);
            }
        }
        if !self.busy_poll.is_zero() && !self.devices.is_empty() {
            self.spin();
        }
        Ok(())
    }

    /// Hands the reads the devices queued to the kernel. A failed submit is not
    /// expected (the queue has room by construction); it is logged, and the reads stay
    /// queued for the next one.
    fn submit_reads(&mut self) {
        if let Some(r) = self.reads.as_mut() {
            if let Err(e) = r.submit() {
                warn!(self.log, "io_uring submit failed"; "error" => %e);
            }
        }
    }

    /// Completions from the io_uring: complete them all (or hand them to the workers
    /// to be read again), then one kick per device. Returns whether there were any.
    fn complete_reads(&mut self) -> bool {
        let Some(r) = self.reads.as_mut() else {
            return false;
        };
        if !r.ready() {
            return false;
        }
        let mut touched = Vec::new();
        for done in r.reap() {
            touched.push(done.tag.device);
            if let Some(d) = self.devices.get_mut(&done.tag.device) {
                d.on_read(done);
            }
        }
        self.after_completions(touched);
        true
    }

    /// After a batch of completions of the devices `touched` (repeats allowed): one
    /// [`Device::after_completions`] each (a kick, or a reset's re-serve), then the
    /// reads that queued.
    fn after_completions(&mut self, mut touched: Vec<usize>) {
        touched.sort_unstable();
        touched.dedup();
        for id in touched {
            if let Some(d) = self.devices.get_mut(&id) {
                d.after_completions(id, self.reads.as_mut());
            }
        }
        self.submit_reads();
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
        let any = !touched.is_empty();
        self.after_completions(touched);
        any
    }

    /// The busy poll of [`EventLoop::set_busy_poll`].
    /// The clock is read once per [`SPIN_CLOCK_EVERY`] idle rounds and after work, not
    /// every round: where reading it is a system call (a clock source without a vDSO
    /// read, such as a VM's HPET), a spin that read it every round would mostly spin
    /// in the kernel.
    fn spin(&mut self) {
        let start = Instant::now();
        let mut last_work = start;
        let mut idle_rounds = 0u32;
        loop {
            let mut any = false;
            for (&id, d) in self.devices.iter_mut() {
                if d.pending() {
                    d.serve(id, self.reads.as_mut());
                    any = true;
                }
            }
            if any {
                self.submit_reads();
            }
            any |= self.complete_reads();
            any |= self.complete_done();
            if any {
                last_work = Instant::now();
                idle_rounds = 0;
            } else {
                idle_rounds += 1;
                if idle_rounds.is_multiple_of(SPIN_CLOCK_EVERY) {
                    let now = Instant::now();
                    if now - last_work >= self.busy_poll || now - start >= MAX_SPIN {
                        return;
                    }
                }
            }
            std::hint::spin_loop();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn design_doc_states_the_stop_bound_the_deadline_and_idle_retirement() {
        let doc = include_str!("../docs/DESIGN.md");
        for want in [
            format!("up to {} s", STOP_BOUND.as_secs()),
            format!("more than {} s for a worker", QUEUE_DEADLINE.as_secs()),
            format!(
                "retired after {} s without work",
                crate::workers::IDLE_RETIRE.as_secs()
            ),
            format!("checked every {} ms", EXPIRY_TICK.as_millis()),
        ] {
            assert!(doc.contains(&want), "docs/DESIGN.md lacks {want:?}");
        }
    }
}
