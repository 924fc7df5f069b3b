//! lc's cache engine: the dm-lc log-structured write-back cache as a userspace library.
//!
//! One *cache device* (fast) holds a superblock and a ring of segments; up to 255
//! *backing devices* (slow) are cached through it. Writes are appended to the open
//! segment in RAM, sealed segments are written to the ring by the flusher thread, and
//! dirty lines are written back to the backing devices by the writeback thread. After a
//! crash, [`Cache::open`] replays the valid part of the log. `docs/FORMAT.md` describes
//! the on-disk records and `docs/DESIGN.md` the data path, threads and lock order.
//!
//! The engine knows nothing of SCSI or TCMU.
#![forbid(unsafe_code)]

mod checkpoint;
mod clean;
mod damage;
pub mod device;
mod engine;
pub mod error;
mod flush;
pub mod format;
pub mod index;
mod iov;
mod linecrc;
mod logio;
mod open;
mod readahead;
mod recovery;
mod scrub;
mod sidewrite;
mod state;
pub mod stats;
pub mod testing;
pub mod tunables;
mod writeback;

pub use damage::DamageReport;
pub use device::{BlockDevice, FileDevice, MemDevice};
pub use engine::{Backing, Cache, DeviceRead, DeviceReads, DrainProgress, URING_CHECKED_LINES};
pub use error::{Error, Failure, Result};
pub use format::Geometry;
pub use open::OpenOptions;
pub use recovery::{
    check_device, format_device, probe, CheckReport, CheckpointUse, FormatOptions, RecoveryReport,
};
pub use scrub::{ScrubProgress, ScrubReport};
pub use stats::Stats;
pub use tunables::Tunables;
