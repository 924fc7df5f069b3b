//! I/O workers. Every served device has its own: up to `io_threads` threads, started
//! when its commands queue up and retired after [`IDLE_RETIRE`] without work, so a
//! device whose backend hangs holds only its own threads and never the ones another
//! device needs (`docs/DESIGN.md`, "Isolation"). Workers never touch a ring: a
//! [`Job`] carries the parsed command and the command's buffer lent from the ring's data area
//! ([`JobData`]: a write's Data-Out is read from it, a READ fills it) in, a [`Done`]
//! carries the response and the loan back over a channel, followed by a wake-up of the
//! event loop.

use std::collections::VecDeque;
use std::sync::mpsc::Sender;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::scsi::{self, BlockBackend, Data, LunState};
use crate::shm::Lent;

/// How long an idle worker waits for a command before it exits.
pub const IDLE_RETIRE: Duration = Duration::from_secs(10);

/// A unit of work for a device's workers.
pub struct Job {
    /// Which device (event-loop token value).
    pub device: usize,
    /// The command id on that device's ring.
    pub cmd_id: u16,
    /// The command, parsed once when it was fetched.
    pub command: scsi::Command,
    /// The command's buffer.
    pub data: JobData,
    /// The LUN.
    pub lun: Arc<LunState>,
    /// The backend.
    pub backend: Arc<dyn BlockBackend>,
    /// When it was queued.
    pub queued: Instant,
}

/// A finished job.
pub struct Done {
    /// Which device.
    pub device: usize,
    /// The command id.
    pub cmd_id: u16,
    /// The outcome.
    pub response: scsi::ScsiResponse,
    /// The command's buffer, back to the loop (which completes the command after
    /// zeroing what a READ did not fill, and gives the loan back).
    pub data: JobData,
}

/// A command's buffer, lent from its ring's data area, used in place.
pub enum JobData {
    /// Data-Out (a write's data, a parameter list); the commands that go to workers
    /// other than READ have no Data-In.
    Out(Lent),
    /// A READ's Data-In buffer, filled in place.
    In(Lent),
}

impl JobData {
    /// The loan.
    pub fn lent(&mut self) -> &mut Lent {
        match self {
            JobData::Out(l) | JobData::In(l) => l,
        }
    }

    /// Runs the command on its buffer: [`scsi::execute_data`], or
    /// [`scsi::try_execute_data`] when `!wait` (`None`: it would block).
    pub fn execute(
        &mut self,
        lun: &LunState,
        command: &scsi::Command,
        be: &dyn BlockBackend,
        wait: bool,
    ) -> Option<scsi::ScsiResponse> {
        let run = |data: Data<'_, '_>| {
            if wait {
                Some(scsi::execute_data(lun, command, data, be))
            } else {
                scsi::try_execute_data(lun, command, data, be)
            }
        };
        match self {
            JobData::Out(l) => run(Data::Out(&l.slices(), 0)),
            JobData::In(l) => run(Data::In(&mut l.slices_mut())),
        }
    }
}

/// A command a worker is executing (for logs about slow or stuck commands).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Running {
    /// Its ring id.
    pub cmd_id: u16,
    /// Its opcode, by name.
    pub op: &'static str,
    /// How long it has been running.
    pub running_for: Duration,
}

/// Called after each result is sent (a `mio::Waker::wake` in the daemon).
pub type Notify = Arc<dyn Fn() + Send + Sync>;

#[derive(Default)]
struct Queue {
    jobs: VecDeque<Job>,
    /// Threads waiting for work.
    idle: usize,
    /// Threads started and not yet exited.
    alive: usize,
    stop: bool,
    running: Vec<(u16, &'static str, Instant)>,
}

#[derive(Default)]
struct Shared {
    q: Mutex<Queue>,
    /// Signalled when a job is queued or the workers are told to stop.
    work: Condvar,
    /// Signalled when a worker exits.
    exited: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.q.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The workers of one device.
pub struct Workers {
    shared: Arc<Shared>,
    max: usize,
    name: String,
    spawned: usize,
    done: Sender<Done>,
    notify: Notify,
    threads: Vec<JoinHandle<()>>,
}

impl Workers {
    /// Workers named `<name>.<n>` (at most 15 bytes used by the kernel), at most `max`
    /// at once; results go to `done`, each followed by `notify()`.
    pub fn new(name: &str, max: usize, done: Sender<Done>, notify: Notify) -> Workers {
        Workers {
            shared: Arc::default(),
            max: max.max(1),
            name: name.to_string(),
            spawned: 0,
            done,
            notify,
            threads: Vec::new(),
        }
    }

    /// Queues a job, starting a worker if every running one is busy and fewer than
    /// `max` run. Gives the job back if no worker exists and none can be started.
    pub fn submit(&mut self, job: Job) -> Result<(), Job> {
        let mut q = self.shared.lock();
        q.jobs.push_back(job);
        if q.jobs.len() > q.idle && q.alive < self.max {
            q.alive += 1;
            drop(q);
            if !self.spawn() {
                let mut q = self.shared.lock();
                q.alive -= 1;
                if q.alive == 0 {
                    return Err(q.jobs.pop_back().expect("just queued"));
                }
            }
        } else {
            drop(q);
        }
        self.shared.work.notify_one();
        Ok(())
    }

    fn spawn(&mut self) -> bool {
        self.threads.retain(|t| !t.is_finished());
        let shared = self.shared.clone();
        let done = self.done.clone();
        let notify = self.notify.clone();
        let r = std::thread::Builder::new()
            .name(format!("{}.{}", self.name, self.spawned % 1000))
            .spawn(move || work(&shared, &done, &notify));
        self.spawned += 1;
        match r {
            Ok(t) => {
                self.threads.push(t);
                true
            }
            Err(_) => false,
        }
    }

    /// Threads alive now.
    pub fn threads(&self) -> usize {
        self.shared.lock().alive
    }

    /// Removes and returns the jobs that have waited for a worker longer than
    /// `deadline` (their workers are all stuck or slow).
    pub fn expire(&self, deadline: Duration) -> Vec<Job> {
        let now = Instant::now();
        let mut q = self.shared.lock();
        let (old, keep): (Vec<Job>, Vec<Job>) = q
            .jobs
            .drain(..)
            .partition(|j| now.duration_since(j.queued) > deadline);
        q.jobs = keep.into();
        old
    }

    /// The commands being executed now, longest-running first.
    pub fn running(&self) -> Vec<Running> {
        let now = Instant::now();
        let mut r: Vec<Running> = self
            .shared
            .lock()
            .running
            .iter()
            .map(|&(cmd_id, op, since)| Running {
                cmd_id,
                op,
                running_for: now.duration_since(since),
            })
            .collect();
        r.sort_by_key(|x| std::cmp::Reverse(x.running_for));
        r
    }

    /// Tells the workers to exit (queued jobs are dropped) and waits up to `bound` for
    /// them; the commands still running when the bound passes are returned (those
    /// threads are left to finish on their own; their results go nowhere).
    pub fn stop(&mut self, bound: Duration) -> Result<(), Vec<Running>> {
        let deadline = Instant::now() + bound;
        let mut q = self.shared.lock();
        q.stop = true;
        q.jobs.clear();
        self.shared.work.notify_all();
        while q.alive > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            q = self
                .shared
                .exited
                .wait_timeout(q, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        let alive = q.alive;
        drop(q);
        if alive > 0 {
            return Err(self.running());
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        Ok(())
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        // Never blocks: a stuck worker is left to finish; its result goes nowhere.
        self.shared.lock().stop = true;
        self.shared.work.notify_all();
    }
}

fn work(shared: &Shared, done: &Sender<Done>, notify: &Notify) {
    let mut q = shared.lock();
    loop {
        if q.stop {
            break;
        }
        if let Some(job) = q.jobs.pop_front() {
            q.running
                .push((job.cmd_id, job.command.name(), Instant::now()));
            drop(q);
            let mut job = job;
            let response = job
                .data
                .execute(&job.lun, &job.command, job.backend.as_ref(), true)
                .expect("a waiting run answers");
            let sent = done
                .send(Done {
                    device: job.device,
                    cmd_id: job.cmd_id,
                    response,
                    data: job.data,
                })
                .is_ok();
            if sent {
                notify();
            }
            q = shared.lock();
            if let Some(i) = q.running.iter().position(|r| r.0 == job.cmd_id) {
                q.running.swap_remove(i);
            }
            if !sent {
                break;
            }
            continue;
        }
        q.idle += 1;
        let (g, t) = shared
            .work
            .wait_timeout(q, IDLE_RETIRE)
            .unwrap_or_else(|e| e.into_inner());
        q = g;
        q.idle -= 1;
        if t.timed_out() && q.jobs.is_empty() {
            break;
        }
    }
    q.alive -= 1;
    drop(q);
    shared.exited.notify_all();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scsi::{IoError, LunConfig};
    use crate::shm::{memfd, SharedMap};
    use std::os::fd::AsFd;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::mpsc::channel;

    /// Reads block while `hold` is set.
    struct Held {
        hold: AtomicBool,
        started: AtomicUsize,
    }

    impl BlockBackend for Held {
        fn read(&self, _offset: u64, bufs: &mut [&mut [u8]]) -> Result<(), IoError> {
            self.started.fetch_add(1, Ordering::SeqCst);
            while self.hold.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(2));
            }
            for b in bufs.iter_mut() {
                b.fill(1);
            }
            Ok(())
        }
        fn write(&self, _: u64, _: &[&[u8]], _: bool) -> Result<(), IoError> {
            Ok(())
        }
        fn flush(&self) -> Result<(), IoError> {
            Ok(())
        }
        fn discard(&self, _: u64, _: u64) -> Result<(), IoError> {
            Ok(())
        }
    }

    /// A mapping to lend Data-In buffers from.
    fn memory() -> Arc<SharedMap> {
        let fd = memfd("workers-test", 1 << 16).unwrap();
        let mut m = SharedMap::map(fd.as_fd(), 1 << 16).unwrap();
        m.set_lendable(0).unwrap();
        Arc::new(m)
    }

    fn job(id: u16, be: &Arc<Held>, mem: &Arc<SharedMap>) -> Job {
        Job {
            device: 0,
            cmd_id: id,
            command: scsi::Command::parse(&scsi::cdb::build10(0x28, 0, 1, 0)).unwrap(),
            data: JobData::In(mem.lend(&[(id as u64 * 512, 512)]).unwrap()),
            lun: Arc::new(LunState::new(LunConfig::new("w", 512, 100))),
            backend: be.clone(),
            queued: Instant::now(),
        }
    }

    #[test]
    fn workers_start_on_demand_up_to_the_limit_and_stop_when_told() {
        let be = Arc::new(Held {
            hold: AtomicBool::new(true),
            started: AtomicUsize::new(0),
        });
        let (tx, rx) = channel();
        let mut w = Workers::new("t", 3, tx, Arc::new(|| {}));
        assert_eq!(w.threads(), 0, "no thread before work");
        let mem = memory();
        for id in 1..=5 {
            w.submit(job(id, &be, &mem)).ok().unwrap();
        }
        let t0 = Instant::now();
        while be.started.load(Ordering::SeqCst) < 3 {
            assert!(t0.elapsed() < Duration::from_secs(10));
            std::thread::sleep(Duration::from_millis(1));
        }
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(be.started.load(Ordering::SeqCst), 3, "at most 3 at once");
        assert_eq!(w.threads(), 3);
        assert_eq!(w.running().len(), 3);
        // The two queued ones can be expired; the running ones cannot.
        std::thread::sleep(Duration::from_millis(5));
        let old = w.expire(Duration::from_millis(1));
        assert_eq!(old.len(), 2);
        // A bound shorter than the stuck commands reports them.
        let stuck = w.stop(Duration::from_millis(30)).unwrap_err();
        assert_eq!(stuck.len(), 3);
        assert!(stuck.iter().all(|r| r.op == "READ"));
        be.hold.store(false, Ordering::SeqCst);
        w.stop(Duration::from_secs(10)).unwrap();
        assert_eq!(w.threads(), 0);
        let done: Vec<Done> = rx.try_iter().collect();
        assert_eq!(done.len(), 3);
        for mut d in done {
            assert_eq!(d.response.placed, 512, "read in place");
            assert_eq!(d.data.lent().slices()[0], &[1u8; 512][..]);
        }
    }
}
