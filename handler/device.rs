//! One served LUN: a TCMU ring, its SCSI state, the cache-engine backend, and its own
//! I/O workers (`handler/workers.rs`) that run blocking commands off the event-loop
//! thread.
//!
//! The event loop owns every [`Device`] (and so every ring); workers never touch the
//! ring. A command's iovecs are lent as slices of the data area (`Ring::lend`) for as
//! long as it runs: a WRITE's Data-Out is copied from them into the engine's segment
//! buffer and a READ's Data-In is read straight into them, with no staging copy. A
//! command that needs the backend is tried on the loop thread, else executed by one of
//! the device's workers with its loan, and its result comes back over a channel with a
//! `mio::Waker` wake-up; the loop zeroes Data-In the command did not fill, gives the
//! loan back, completes the entry and kicks.

use std::sync::mpsc::Receiver;
use std::sync::Arc;
use std::time::{Duration, Instant};

use slog::{error, info, warn, Logger};

use crate::ring::{Command, Doorbell, Fetched, Malformed, Response, Ring, RingError};
use crate::scsi::{self, BlockBackend, IoError, IoErrorKind, LunState, StartedRead};
use crate::shm::{Lent, LoanRead, LoanReads, ShmError};
pub use crate::workers::{Done, Job, JobData, Running, Workers};

/// The engine as a SCSI block backend for one backing device id.
pub struct EngineBackend {
    /// The cache.
    pub cache: Arc<lc_cache::Cache>,
    /// Backing device id inside the cache.
    pub dev: u8,
}

/// The one classification of the engine's errors for the SCSI layer (which maps the
/// kind to sense, `IoError::response`): a device or the data at an offset (MEDIUM
/// ERROR), or the cache itself (HARDWARE ERROR). `request` is the byte range of the
/// call that failed, if it has one. The engine's offset is on the device that failed,
/// which may be the cache device, not the LUN: only an offset inside the request names
/// a block of this LUN (a lost line that begins before the request names the
/// request's first byte); any other is dropped, and the SCSI layer reports the
/// command's own first block.
fn io_err(e: lc_cache::Error, request: Option<(u64, u64)>) -> IoError {
    use lc_cache::Error as E;
    let kind = match &e {
        E::Io { .. } | E::Lost { .. } | E::BackingFailed { .. } => IoErrorKind::Medium,
        E::Failed(_)
        | E::Superblock(_)
        | E::LogBlocked { .. }
        | E::BadFormat { .. }
        | E::Rotten { .. }
        | E::Version { .. }
        | E::Invalid(_)
        | E::Tunable { .. } => IoErrorKind::Target,
    };
    let offset = match (e.io_offset(), request) {
        (Some(o), Some((start, len))) if o < start.saturating_add(len) => {
            let in_request = o >= start || matches!(e, E::Lost { .. });
            in_request.then_some(o.max(start))
        }
        _ => None,
    };
    IoError {
        offset,
        message: e.to_string(),
        kind,
    }
}

/// Total length of a transfer's pieces.
fn total<T: AsRef<[u8]>>(pieces: &[T]) -> u64 {
    pieces.iter().map(|p| p.as_ref().len() as u64).sum()
}

impl BlockBackend for EngineBackend {
    fn read(&self, offset: u64, bufs: &mut [&mut [u8]]) -> Result<(), IoError> {
        let request = Some((offset, total(bufs)));
        self.cache
            .read_vectored(self.dev, offset, bufs)
            .map_err(|e| io_err(e, request))
    }
    fn write(&self, offset: u64, data: &[&[u8]], fua: bool) -> Result<(), IoError> {
        self.cache
            .write_vectored(self.dev, offset, data, fua)
            .map_err(|e| io_err(e, Some((offset, total(data)))))
    }
    fn flush(&self) -> Result<(), IoError> {
        self.cache.flush().map_err(|e| io_err(e, None))
    }
    fn discard(&self, offset: u64, len: u64) -> Result<(), IoError> {
        self.cache
            .discard(self.dev, offset, len)
            .map_err(|e| io_err(e, Some((offset, len))))
    }
    fn try_read(&self, offset: u64, bufs: &mut [&mut [u8]]) -> Option<Result<(), IoError>> {
        let request = Some((offset, total(bufs)));
        Some(
            self.cache
                .try_read_vectored(self.dev, offset, bufs)?
                .map_err(|e| io_err(e, request)),
        )
    }
    fn start_read(&self, offset: u64, bufs: &mut [&mut [u8]]) -> Option<StartedRead> {
        let (fd, align) = self.cache.cache_fd()?;
        let plan = self.cache.start_read(self.dev, offset, bufs).ok()??;
        let reads = plan
            .reads
            .iter()
            .map(|r| (r.device_offset, r.pos, r.len))
            .collect();
        let cache = self.cache.clone();
        Some(StartedRead {
            fd,
            align,
            reads,
            finish: Box::new(move |bufs| cache.finish_read(plan, bufs)),
        })
    }
    fn try_write(&self, offset: u64, data: &[&[u8]]) -> Option<Result<(), IoError>> {
        Some(
            self.cache
                .try_write_vectored(self.dev, offset, data)?
                .map_err(|e| io_err(e, Some((offset, total(data))))),
        )
    }
}

/// A READ the event loop's io_uring reads ([`Device::serve`] queues it,
/// [`Device::on_read`] completes it).
pub struct ReadTag {
    /// Which device (event-loop token value).
    pub device: usize,
    cmd_id: u16,
    command: scsi::Command,
    /// Bytes the answer places in the Data-In.
    placed: usize,
    finish: scsi::FinishRead,
}

/// The event loop's io_uring reads into loans.
pub type Reads = LoanReads<ReadTag>;

/// A command of one device on its workers or in its loop's io_uring (its loan travels
/// with the job or the read).
struct InFlight {
    cmd_id: u16,
}

/// Whether a device is served.
#[derive(Debug)]
enum State {
    Serving,
    /// Stopping (device removal, daemon stop): nothing new is fetched; commands on
    /// workers are still completed and published.
    Draining,
    /// The ring lost its framing: no fetching until the commands on workers are back,
    /// then the kernel resets the ring and serving resumes.
    Resetting,
    /// No longer served (mapping gone, or a broken ring that cannot be reset).
    Failed(String),
}

/// Malformed entries logged per device; later ones are only counted.
const MALFORMED_LOGGED: u64 = 10;

/// One LUN served from a ring.
pub struct Device {
    /// Name for logs (`<hba>/<name>`).
    pub name: String,
    ring: Ring,
    bell: Box<dyn Doorbell>,
    lun: Arc<LunState>,
    backend: Arc<dyn BlockBackend>,
    inflight: Vec<InFlight>,
    workers: Option<Workers>,
    /// Whether a warning about commands overdue on the workers is out.
    overdue_logged: bool,
    state: State,
    malformed: u64,
    resets: u64,
    /// Why the ring is being reset.
    broken_by: Option<String>,
    /// Whether commands that need no blocking I/O are served on the loop thread.
    inline: bool,
    /// READs answered from the loop's io_uring.
    uring_reads: u64,
    log: Logger,
}

impl Device {
    /// A device over `ring`, answering with `lun` on `backend`.
    pub fn new(
        name: &str,
        ring: Ring,
        bell: Box<dyn Doorbell>,
        lun: Arc<LunState>,
        backend: Arc<dyn BlockBackend>,
        log: Logger,
    ) -> Device {
        info!(log, "device attached"; "device" => name, "blocks" => lun.num_blocks(),
              "block_size" => lun.cfg.block_size, "out_of_order" => ring.out_of_order(),
              "ring" => ring.describe());
        // A copy target of EXTENDED COPY commands to any LUN of this daemon.
        scsi::xcopy::register(&lun, &backend);
        Device {
            name: name.to_string(),
            ring,
            bell,
            lun,
            backend,
            inflight: Vec::new(),
            workers: None,
            overdue_logged: false,
            state: State::Serving,
            malformed: 0,
            resets: 0,
            broken_by: None,
            inline: true,
            uring_reads: 0,
            log,
        }
    }

    /// With `false`, no backend command is served inline on the loop thread (RAM hits,
    /// page-cache hits, plain writes): each goes to a worker, or, a READ of data on the
    /// cache device, to the loop's io_uring when it has one (for benchmarks comparing
    /// the paths, and tests of the io_uring path whatever the file system under them).
    pub fn set_inline(&mut self, on: bool) {
        self.inline = on;
    }

    /// The fd to poll.
    pub fn fd(&self) -> std::os::fd::RawFd {
        self.bell.fd()
    }

    /// Why the device stopped being served, if it did.
    pub fn failure(&self) -> Option<&str> {
        match &self.state {
            State::Failed(why) => Some(why),
            _ => None,
        }
    }

    /// How many times the ring was reset after it lost its framing.
    pub fn resets(&self) -> u64 {
        self.resets
    }

    /// Malformed entries completed with an error (or skipped) so far.
    pub fn malformed(&self) -> u64 {
        self.malformed
    }

    /// READs answered from the event loop's io_uring.
    pub fn uring_reads(&self) -> u64 {
        self.uring_reads
    }

    /// Commands handed to workers and not yet completed.
    pub fn busy(&self) -> usize {
        self.inflight.len()
    }

    /// Gives the device its workers (the event loop does, when it adds the device).
    /// Without workers, blocking commands run on the caller's thread.
    pub fn set_workers(&mut self, w: Workers) {
        self.workers = Some(w);
    }

    /// Worker threads alive now.
    pub fn worker_threads(&self) -> usize {
        self.workers.as_ref().map_or(0, |w| w.threads())
    }

    /// The commands the workers are executing, longest-running first.
    pub fn running(&self) -> Vec<Running> {
        self.workers.as_ref().map_or(Vec::new(), |w| w.running())
    }

    /// Stops fetching (device removal or daemon stop); commands on workers are still
    /// completed as they finish.
    pub fn begin_stop(&mut self) {
        if matches!(self.state, State::Serving) {
            self.state = State::Draining;
        }
    }

    /// Stops the workers, waiting up to `bound`; the commands still running then are
    /// returned.
    pub fn stop_workers(&mut self, bound: Duration) -> Result<(), Vec<Running>> {
        match &mut self.workers {
            Some(w) => w.stop(bound),
            None => Ok(()),
        }
    }

    /// Per-command deadline: commands that waited longer than `deadline` for a worker
    /// (every worker of this device busy: a slow or hung backend) complete with
    /// CHECK CONDITION, ABORTED COMMAND / COMMAND TIMEOUT BEFORE PROCESSING (the
    /// initiator retries or fails them instead of hanging); commands running longer
    /// than that are logged once per episode.
    pub fn expire(&mut self, deadline: Duration) {
        let Some(w) = &self.workers else { return };
        let old = w.expire(deadline);
        let overdue: Vec<Running> = w
            .running()
            .into_iter()
            .filter(|r| r.running_for > deadline)
            .collect();
        if !overdue.is_empty() && !self.overdue_logged {
            warn!(self.log, "commands stuck on the workers"; "device" => &self.name,
                  "running" => format!("{overdue:?}"), "queued_expired" => old.len());
        }
        self.overdue_logged = !overdue.is_empty();
        if old.is_empty() {
            return;
        }
        if matches!(self.state, State::Resetting) {
            // The reset completes them (BUSY); it may now be due.
            self.inflight
                .retain(|f| !old.iter().any(|j| j.cmd_id == f.cmd_id));
            return self.try_reset();
        }
        for mut job in old {
            let Some(i) = self.inflight.iter().position(|f| f.cmd_id == job.cmd_id) else {
                continue;
            };
            self.inflight.swap_remove(i);
            if matches!(self.state, State::Serving | State::Draining) {
                let r = scsi::ScsiResponse::timed_out();
                if let Err(e) = self.finish(job.cmd_id, &mut job.data, r) {
                    return self.ring_broken(e);
                }
            }
        }
        self.publish();
    }

    fn fail(&mut self, why: String) {
        if !matches!(self.state, State::Failed(_)) {
            error!(self.log, "device failed, no longer served"; "device" => &self.name, "error" => &why);
            self.state = State::Failed(why);
        }
    }

    /// The ring cannot be served as it is. A gone mapping fails the device; anything
    /// else is a ring that lost its framing: reset it (once the workers have handed
    /// back every command of this device: a completion after the reset would name a
    /// freed id and break the kernel's ring).
    fn ring_broken(&mut self, e: RingError) {
        if e.is_gone() || self.ring.is_gone() {
            return self.fail(format!("{e}"));
        }
        if matches!(self.state, State::Serving) {
            error!(self.log, "ring unusable, resetting it"; "device" => &self.name, "error" => %e,
                   "on_workers" => self.inflight.len());
            self.state = State::Resetting;
            self.broken_by = Some(e.to_string());
        }
        self.try_reset();
    }

    fn try_reset(&mut self) {
        if !matches!(self.state, State::Resetting) || !self.inflight.is_empty() {
            return;
        }
        let why = self.broken_by.take().unwrap_or_default();
        match self.bell.reset_ring() {
            Ok(true) => match self.ring.restart() {
                Ok(()) => {
                    self.resets += 1;
                    self.state = State::Serving;
                    info!(self.log, "ring reset, serving again"; "device" => &self.name,
                          "ring" => self.ring.describe());
                }
                Err(e) => self.fail(format!("{why}; after the ring reset: {e}")),
            },
            Ok(false) => self.fail(format!("{why} (and this kernel cannot reset the ring)")),
            Err(e) => self.fail(format!("{why}; ring reset failed: {e}")),
        }
    }

    /// A malformed entry: a command gets CHECK CONDITION (HARDWARE ERROR / INTERNAL
    /// TARGET FAILURE) and the ring goes on.
    fn refuse(&mut self, m: Malformed) -> Result<(), RingError> {
        self.malformed += 1;
        if self.malformed <= MALFORMED_LOGGED {
            warn!(self.log, "malformed ring entry refused"; "device" => &self.name,
                  "offset" => m.offset, "cmd_id" => m.cmd_id, "fault" => %m.fault,
                  "count" => self.malformed);
        }
        match m.cmd_id {
            Some(id) => self.complete(id, scsi::ScsiResponse::internal_failure(), None),
            None => Ok(()),
        }
    }

    /// Handles readiness of the device fd: fetches new entries, answers what needs no
    /// I/O at once, hands the rest to the workers.
    pub fn on_readable(&mut self, token: usize, reads: Option<&mut Reads>) {
        let _ = self.bell.ack();
        self.serve(token, reads);
    }

    /// Whether the kernel queued commands not fetched yet (a shared-memory load, no
    /// system call: the event loop's busy poll).
    pub fn pending(&self) -> bool {
        matches!(self.state, State::Serving) && self.ring.pending()
    }

    /// Fetches new entries, answers what needs no I/O at once, queues READs of data on
    /// the cache device on `reads` (the loop's io_uring, which the caller submits), hands
    /// the rest to the workers.
    pub fn serve(&mut self, token: usize, mut reads: Option<&mut Reads>) {
        self.try_reset();
        if !matches!(self.state, State::Serving) {
            return;
        }
        let fetched = match self.ring.fetch() {
            Ok(f) => f,
            Err(e) => return self.ring_broken(e),
        };
        for f in fetched {
            let cmd: Command = match f {
                Fetched::Cmd(c) => c,
                // Aborted commands are still completed normally (`docs/TCMU.md` §1.7).
                Fetched::Tmr(_) => continue,
                Fetched::Malformed(m) => {
                    if let Err(e) = self.refuse(m) {
                        return self.ring_broken(e);
                    }
                    continue;
                }
            };
            let data_in_len = cmd.data_len() as usize;
            let lent = match self.ring.lend(&cmd.iovs) {
                Ok(l) => l,
                Err(RingError::Shm(ShmError::Gone)) => {
                    return self.ring_broken(RingError::Shm(ShmError::Gone))
                }
                // Iovecs sharing bytes with another command's (still running): a
                // kernel that does that is broken; refuse the command, not the ring.
                Err(e) => {
                    self.malformed += 1;
                    if self.malformed <= MALFORMED_LOGGED {
                        warn!(self.log, "ring entry refused: its data is lent to another command";
                              "device" => &self.name, "cmd_id" => cmd.cmd_id, "error" => %e,
                              "count" => self.malformed);
                    }
                    let r = scsi::ScsiResponse::internal_failure();
                    if let Err(e) = self.complete(cmd.cmd_id, r, None) {
                        return self.ring_broken(e);
                    }
                    continue;
                }
            };
            // The one parse of the CDB: what runs below is the parsed command.
            let command = match scsi::Command::parse(&cmd.cdb) {
                Ok(c) if c.needs_backend() => c,
                parsed => {
                    // No medium access (or a CDB that does not parse): a parameter
                    // list in, a small response out, both copied whole (parsed as one
                    // buffer).
                    let mut lent = lent;
                    let data_out = match lent.gather() {
                        Ok(d) => d,
                        Err(e) => return self.ring_broken(e.into()),
                    };
                    let r = match parsed {
                        Ok(c) => scsi::execute_data(
                            &self.lun,
                            &c,
                            scsi::Data::Out(&[&data_out], data_in_len),
                            self.backend.as_ref(),
                        ),
                        Err(sense) => scsi::ScsiResponse::error(sense),
                    };
                    if let Err(e) = self.complete(cmd.cmd_id, r, Some(&mut lent)) {
                        return self.ring_broken(e);
                    }
                    continue;
                }
            };
            // Data-In (a READ) is filled in place in the iovecs; every other command
            // that reaches the backend reads its Data-Out from them (and has no
            // Data-In).
            let mut data = match command.direction() {
                scsi::Direction::FromDevice => JobData::In(lent),
                scsi::Direction::ToDevice | scsi::Direction::None => JobData::Out(lent),
            };
            // Served here when no device I/O is needed (RAM hits, plain writes with a
            // free buffer); everything that could block goes to a worker.
            if self.inline {
                let be = self.backend.as_ref();
                if let Some(r) = data.execute(&self.lun, &command, be, false) {
                    if let Err(e) = self.finish(cmd.cmd_id, &mut data, r) {
                        return self.ring_broken(e);
                    }
                    continue;
                }
            }
            // A READ of data on the cache device: read by the loop's io_uring.
            let data = match (reads.as_deref_mut(), data) {
                (Some(r), JobData::In(lent)) => {
                    match self.start_read(r, token, cmd.cmd_id, &command, lent) {
                        Ok(()) => {
                            self.inflight.push(InFlight { cmd_id: cmd.cmd_id });
                            continue;
                        }
                        Err(lent) => JobData::In(lent),
                    }
                }
                (_, d) => d,
            };
            if let Err(e) = self.hand_to_workers(token, cmd.cmd_id, command, data) {
                return self.ring_broken(e);
            }
        }
        self.publish();
    }

    /// Queues a READ on the loop's io_uring when the backend can begin it there;
    /// otherwise gives the loan back.
    fn start_read(
        &mut self,
        r: &mut Reads,
        token: usize,
        cmd_id: u16,
        command: &scsi::Command,
        mut lent: Lent,
    ) -> Result<(), Lent> {
        let started = {
            let mut bufs = lent.slices_mut();
            scsi::start_read(&self.lun, command, &mut bufs, self.backend.as_ref())
        };
        let Some((s, placed)) = started else {
            return Err(lent);
        };
        let tag = ReadTag {
            device: token,
            cmd_id,
            command: *command,
            placed,
            finish: s.finish,
        };
        r.read(lent, s.fd, s.align, &s.reads, tag)
            .map_err(|(lent, _)| lent)
    }

    /// Completes a READ the loop's io_uring read: GOOD when every read filled its
    /// bytes and the backend says they are the answer; otherwise the command is read
    /// again in full on a worker (which reports any error as the LUN's).
    pub fn on_read(&mut self, done: LoanRead<ReadTag>) {
        let LoanRead { lent, ok, tag } = done;
        let cmd_id = tag.cmd_id;
        let Some(i) = self.inflight.iter().position(|f| f.cmd_id == cmd_id) else {
            return;
        };
        self.inflight.swap_remove(i);
        if !matches!(self.state, State::Serving | State::Draining) {
            return;
        }
        let good = ok && !lent.is_gone() && (tag.finish)(&lent.slices());
        let mut data = JobData::In(lent);
        if good {
            self.uring_reads += 1;
            let r = scsi::ScsiResponse::placed(tag.placed);
            if let Err(e) = self.finish(cmd_id, &mut data, r) {
                self.ring_broken(e);
            }
            return;
        }
        if let Err(e) = self.hand_to_workers(tag.device, cmd_id, tag.command, data) {
            self.ring_broken(e);
        }
    }

    /// Hands a command to the device's workers (or runs it here when it has none);
    /// it is in flight until [`Device::on_done`].
    fn hand_to_workers(
        &mut self,
        token: usize,
        cmd_id: u16,
        command: scsi::Command,
        data: JobData,
    ) -> Result<(), RingError> {
        let job = Job {
            device: token,
            cmd_id,
            command,
            data,
            lun: self.lun.clone(),
            backend: self.backend.clone(),
            queued: Instant::now(),
        };
        let refused = match &mut self.workers {
            Some(w) => w.submit(job).err().map(|j| (j, true)),
            None => Some((job, false)),
        };
        let (mut j, r) = match refused {
            None => {
                self.inflight.push(InFlight { cmd_id });
                return Ok(());
            }
            Some((j, true)) => {
                error!(self.log, "cannot start an I/O worker"; "device" => &self.name);
                (j, scsi::ScsiResponse::internal_failure())
            }
            Some((mut j, false)) => {
                let r = j.data.execute(&j.lun, &j.command, j.backend.as_ref(), true);
                (j, r.expect("a waiting run answers"))
            }
        };
        self.finish(cmd_id, &mut j.data, r)
    }

    /// The LUN's mode state (capacity, write cache), shared with the daemon, which
    /// changes it on RECONFIG events.
    pub fn lun(&self) -> Arc<LunState> {
        self.lun.clone()
    }

    /// Completes a command a worker finished.
    pub fn on_done(&mut self, done: Done) {
        let Some(i) = self.inflight.iter().position(|f| f.cmd_id == done.cmd_id) else {
            return;
        };
        self.inflight.swap_remove(i);
        if !matches!(self.state, State::Serving | State::Draining) {
            // Resetting: the kernel completes it (BUSY) with the reset. Failed: nobody.
            return;
        }
        let mut data = done.data;
        if let Err(e) = self.finish(done.cmd_id, &mut data, done.response) {
            self.ring_broken(e)
        }
    }

    /// After a batch of [`Device::on_done`]: resets a ring whose commands are all
    /// back and serves it again, and publishes the tail.
    pub fn after_completions(&mut self, token: usize, reads: Option<&mut Reads>) {
        if matches!(self.state, State::Resetting) {
            self.serve(token, reads);
        } else {
            self.publish();
        }
    }

    /// Completes a command that ran on its loan `data` (a READ's Data-In is in it, or
    /// its Data-Out was read from it).
    fn finish(
        &mut self,
        cmd_id: u16,
        data: &mut JobData,
        r: scsi::ScsiResponse,
    ) -> Result<(), RingError> {
        match data {
            JobData::In(l) => self.complete(cmd_id, r, Some(l)),
            JobData::Out(l) => {
                if l.is_gone() {
                    // What was written may be zeros: never report it GOOD.
                    return Err(RingError::Shm(ShmError::Gone));
                }
                self.complete(cmd_id, r, None)
            }
        }
    }

    /// Writes the response of `cmd_id`; with `data_in`, its Data-In first: `r.data_in`
    /// copied in, or what the command placed there itself kept, and the rest of the
    /// buffer zeroed so no stale data reaches the initiator. The caller gives the loan
    /// back (drops it) before the kernel sees the completion ([`Device::publish`]).
    fn complete(
        &mut self,
        cmd_id: u16,
        r: scsi::ScsiResponse,
        data_in: Option<&mut Lent>,
    ) -> Result<(), RingError> {
        let mut read_len = None;
        if let Some(l) = data_in.filter(|l| !l.is_empty()) {
            if r.placed > 0 {
                l.zero_from(r.placed as u64)?;
            } else {
                l.scatter(&r.data_in)?;
            }
            let produced = r.data_in_len() as u64;
            read_len = (produced < l.len()).then_some(produced as u32);
        }
        self.ring.complete(
            cmd_id,
            Response {
                status: r.status,
                sense: r.sense,
                read_len,
            },
        )
    }

    /// Publishes the tail and kicks the kernel if anything completed.
    pub fn publish(&mut self) {
        match self.ring.publish() {
            Ok(true) => {
                if let Err(e) = self.bell.kick() {
                    error!(self.log, "kick failed"; "device" => &self.name, "error" => %e);
                }
            }
            Ok(false) => {}
            Err(e) => self.ring_broken(e),
        }
    }
}

/// Shared receiving end for [`Done`] results.
pub type DoneRx = Receiver<Done>;

#[cfg(test)]
mod tests {
    use super::*;

    fn io(offset: u64) -> lc_cache::Error {
        lc_cache::Error::io("dev", offset, std::io::Error::other("injected"))
    }

    #[test]
    fn engine_errors_name_a_block_of_the_lun_only_when_the_offset_lies_in_the_request() {
        let request = Some((8192, 4096));
        // A backing-device error inside the request: that block.
        let e = io_err(io(8192 + 1024), request);
        assert_eq!((e.kind, e.offset), (IoErrorKind::Medium, Some(8192 + 1024)));
        // A cache-device offset (outside the request) names no block of the LUN.
        assert_eq!(io_err(io(1 << 30), request).offset, None);
        assert_eq!(io_err(io(0), request).offset, None);
        assert_eq!(io_err(io(0), None).offset, None, "a flush has no request");
        // Lost data: the line may begin before the request; its first byte in it.
        let lost = lc_cache::Error::Lost {
            dev: 0,
            offset: 4096,
        };
        assert_eq!(io_err(lost, request).offset, Some(8192));
        // The target's own failures carry no offset and are HARDWARE ERROR.
        let failed = io_err(lc_cache::Error::Failed(io(8192).into()), request);
        assert_eq!((failed.kind, failed.offset), (IoErrorKind::Target, None));
    }
}
