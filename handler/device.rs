//! One served LUN: a TCMU ring, its SCSI state, and the cache-engine backend, plus the
//! I/O worker pool that runs blocking commands off the event-loop thread.
//!
//! The event loop owns every [`Device`] (and so every ring); workers never touch
//! shared memory. A command that needs the backend is gathered on the loop thread,
//! executed by a worker (`lc-io-N`), and its result comes back over a channel with a
//! `mio::Waker` wake-up; the loop scatters Data-In, completes the entry and kicks.

use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use slog::{error, info, Logger};

use crate::ring::{Command, Doorbell, Fetched, IoVec, Response, Ring, RingError};
use crate::scsi::{self, BlockBackend, IoError, LunState};

/// The engine as a SCSI block backend for one backing device id.
pub struct EngineBackend {
    /// The cache.
    pub cache: Arc<lc_cache::Cache>,
    /// Backing device id inside the cache.
    pub dev: u8,
}

fn io_err(e: lc_cache::Error) -> IoError {
    IoError {
        offset: e.io_offset(),
        message: e.to_string(),
    }
}

impl BlockBackend for EngineBackend {
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), IoError> {
        self.cache.read(self.dev, offset, buf).map_err(io_err)
    }
    fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), IoError> {
        self.cache
            .write(self.dev, offset, data, fua)
            .map_err(io_err)
    }
    fn flush(&self) -> Result<(), IoError> {
        self.cache.flush().map_err(io_err)
    }
    fn discard(&self, offset: u64, len: u64) -> Result<(), IoError> {
        self.cache.discard(self.dev, offset, len).map_err(io_err)
    }
    fn try_read(&self, offset: u64, buf: &mut [u8]) -> Option<Result<(), IoError>> {
        Some(self.cache.try_read(self.dev, offset, buf)?.map_err(io_err))
    }
    fn try_write(&self, offset: u64, data: &[u8]) -> Option<Result<(), IoError>> {
        Some(
            self.cache
                .try_write(self.dev, offset, data)?
                .map_err(io_err),
        )
    }
}

/// A unit of work for the I/O workers.
pub struct Job {
    /// Which device (event-loop token value).
    pub device: usize,
    /// The command id on that device's ring.
    pub cmd_id: u16,
    /// The CDB.
    pub cdb: Vec<u8>,
    /// Gathered Data-Out.
    pub data_out: Vec<u8>,
    /// Room for Data-In.
    pub data_in_len: usize,
    /// The LUN.
    pub lun: Arc<LunState>,
    /// The backend.
    pub backend: Arc<dyn BlockBackend>,
}

/// A finished job.
pub struct Done {
    /// Which device.
    pub device: usize,
    /// The command id.
    pub cmd_id: u16,
    /// The outcome.
    pub response: scsi::ScsiResponse,
}

/// Worker threads executing [`Job`]s; results go to a channel and a wake-up callback.
pub struct WorkerPool {
    tx: Option<Sender<Job>>,
    threads: Vec<JoinHandle<()>>,
}

impl WorkerPool {
    /// Starts `n` workers. `notify` is called after each result is sent (a
    /// `mio::Waker::wake` in the daemon).
    pub fn new(n: usize, done: Sender<Done>, notify: Arc<dyn Fn() + Send + Sync>) -> WorkerPool {
        let (tx, rx) = channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        let threads = (0..n.max(1))
            .map(|i| {
                let rx = rx.clone();
                let done = done.clone();
                let notify = notify.clone();
                std::thread::Builder::new()
                    .name(format!("lc-io-{i}"))
                    .spawn(move || loop {
                        let job = {
                            let rx = rx.lock().unwrap_or_else(|e| e.into_inner());
                            rx.recv()
                        };
                        let Ok(job) = job else { return };
                        let response = scsi::execute(
                            &job.lun,
                            &job.cdb,
                            &job.data_out,
                            job.data_in_len,
                            job.backend.as_ref(),
                        );
                        if done
                            .send(Done {
                                device: job.device,
                                cmd_id: job.cmd_id,
                                response,
                            })
                            .is_err()
                        {
                            return;
                        }
                        notify();
                    })
                    .expect("spawn lc-io worker")
            })
            .collect();
        WorkerPool {
            tx: Some(tx),
            threads,
        }
    }

    /// Queues a job.
    pub fn submit(&self, job: Job) {
        if let Some(tx) = &self.tx {
            let _ = tx.send(job);
        }
    }
}

impl Drop for WorkerPool {
    fn drop(&mut self) {
        self.tx = None;
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Commands of one device waiting for a worker, by id: their Data-In iovecs.
struct InFlight {
    cmd_id: u16,
    iovs: Vec<IoVec>,
}

/// One LUN served from a ring.
pub struct Device {
    /// Name for logs (`<hba>/<name>`).
    pub name: String,
    ring: Ring,
    bell: Box<dyn Doorbell>,
    lun: Arc<LunState>,
    backend: Arc<dyn BlockBackend>,
    inflight: Vec<InFlight>,
    failed: Option<String>,
    /// Whether commands that need no blocking I/O are served on the loop thread.
    inline: bool,
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
            failed: None,
            inline: true,
            log,
        }
    }

    /// Serves every backend command on a worker, none on the loop thread (for
    /// benchmarks comparing both paths).
    pub fn set_inline(&mut self, on: bool) {
        self.inline = on;
    }

    /// The fd to poll.
    pub fn fd(&self) -> std::os::fd::RawFd {
        self.bell.fd()
    }

    /// Why the device stopped being served, if it did.
    pub fn failure(&self) -> Option<&str> {
        self.failed.as_deref()
    }

    /// Commands handed to workers and not yet completed.
    pub fn busy(&self) -> usize {
        self.inflight.len()
    }

    fn fail(&mut self, e: RingError) {
        if self.failed.is_none() {
            error!(self.log, "device failed: malformed ring, no longer served"; "device" => &self.name, "error" => %e);
            self.failed = Some(e.to_string());
        }
    }

    /// Handles readiness of the device fd: fetches new entries, answers what needs no
    /// I/O at once, hands the rest to the workers.
    pub fn on_readable(&mut self, token: usize, pool: &WorkerPool) {
        let _ = self.bell.ack();
        self.serve(token, pool);
    }

    /// Whether the kernel queued commands not fetched yet (a shared-memory load, no
    /// system call: the event loop's busy poll).
    pub fn pending(&self) -> bool {
        self.failed.is_none() && self.ring.pending()
    }

    /// Fetches new entries, answers what needs no I/O at once, hands the rest to the
    /// workers.
    pub fn serve(&mut self, token: usize, pool: &WorkerPool) {
        if self.failed.is_some() {
            return;
        }
        let fetched = match self.ring.fetch() {
            Ok(f) => f,
            Err(e) => return self.fail(e),
        };
        for f in fetched {
            let cmd: Command = match f {
                Fetched::Cmd(c) => c,
                // Aborted commands are still completed normally (tcmu.md 1.7).
                Fetched::Tmr(_) => continue,
            };
            let data_in_len = cmd.data_len() as usize;
            if !scsi::needs_backend(&cmd.cdb) {
                let data_out = match self.ring.gather(&cmd.iovs) {
                    Ok(d) => d,
                    Err(e) => return self.fail(e),
                };
                let r = scsi::execute(
                    &self.lun,
                    &cmd.cdb,
                    &data_out,
                    data_in_len,
                    self.backend.as_ref(),
                );
                if let Err(e) = self.finish(cmd.cmd_id, &cmd.iovs, r) {
                    return self.fail(e);
                }
                continue;
            }
            let writes = !is_read(&cmd.cdb);
            let data_out = if writes {
                match self.ring.gather(&cmd.iovs) {
                    Ok(d) => d,
                    Err(e) => return self.fail(e),
                }
            } else {
                Vec::new()
            };
            // Served here when no device I/O is needed (RAM hits, plain writes with a
            // free buffer); everything that could block goes to a worker.
            if self.inline {
                let din = if writes { 0 } else { data_in_len };
                let be = self.backend.as_ref();
                if let Some(r) = scsi::try_execute(&self.lun, &cmd.cdb, &data_out, din, be) {
                    let iovs = if writes { &[][..] } else { &cmd.iovs[..] };
                    if let Err(e) = self.finish(cmd.cmd_id, iovs, r) {
                        return self.fail(e);
                    }
                    continue;
                }
            }
            self.inflight.push(InFlight {
                cmd_id: cmd.cmd_id,
                iovs: if writes { Vec::new() } else { cmd.iovs.clone() },
            });
            pool.submit(Job {
                device: token,
                cmd_id: cmd.cmd_id,
                cdb: cmd.cdb,
                data_out,
                data_in_len: if writes { 0 } else { data_in_len },
                lun: self.lun.clone(),
                backend: self.backend.clone(),
            });
        }
        self.publish();
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
        let f = self.inflight.swap_remove(i);
        if self.failed.is_some() {
            return;
        }
        if let Err(e) = self.finish(done.cmd_id, &f.iovs, done.response) {
            self.fail(e)
        }
    }

    fn finish(
        &mut self,
        cmd_id: u16,
        iovs: &[IoVec],
        r: scsi::ScsiResponse,
    ) -> Result<(), RingError> {
        let total: u64 = iovs.iter().map(|v| v.len).sum();
        let produced = r.data_in.len() as u64;
        if !iovs.is_empty() {
            self.ring.scatter(iovs, &r.data_in)?;
        }
        let read_len = (produced < total && !iovs.is_empty()).then_some(produced as u32);
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
            Err(e) => self.fail(e),
        }
    }
}

/// Commands whose data moves toward the initiator (their iovecs are Data-In).
fn is_read(cdb: &[u8]) -> bool {
    use crate::scsi::cdb::op;
    matches!(
        cdb.first(),
        Some(&(op::READ_6 | op::READ_10 | op::READ_12 | op::READ_16))
    )
}

/// Shared receiving end for [`Done`] results.
pub type DoneRx = Receiver<Done>;
