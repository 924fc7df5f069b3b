//! The daemon's and the command-line tool's error: one enum whose variants carry the
//! path, name or number they are about. Callers decide on variants, never on text;
//! `main.rs` alone turns an error into a message and an exit code (the control
//! protocol sends the message of a refused request to the client as its `error`).

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;

use crate::config::{CheckError, ConfigError};
use crate::control::ControlError;
use crate::dbus::DbusError;
use crate::ring::RingError;
use crate::units::SizeError;

/// What went wrong in the daemon or in a command.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration file is unusable.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A cfgstring is refused.
    #[error(transparent)]
    Check(#[from] CheckError),
    /// The control socket cannot be created.
    #[error(transparent)]
    Control(#[from] ControlError),
    /// The D-Bus service cannot start (the name is taken: tcmu-runner runs).
    #[error(transparent)]
    Dbus(#[from] DbusError),
    /// A cache device cannot be opened.
    #[error("cache {cache}: {source}")]
    CacheDevice {
        /// The cache's name.
        cache: String,
        /// Why.
        source: io::Error,
    },
    /// A LUN's backing device cannot be opened.
    #[error("lun {lun}: {source}")]
    BackingDevice {
        /// The LUN's name.
        lun: String,
        /// Why.
        source: io::Error,
    },
    /// The engine refused an operation on a cache (opening it, a tunable).
    #[error("cache {cache}: {source}")]
    Cache {
        /// The cache's name.
        cache: String,
        /// Why.
        source: lc_cache::Error,
    },
    /// The engine refused an operation on a LUN's backing device (attach, detach).
    #[error("lun {lun}: {source}")]
    Lun {
        /// The LUN's name.
        lun: String,
        /// Why.
        source: lc_cache::Error,
    },
    /// A control request on a cache failed in the engine (set, flush, commit, drain);
    /// the message is the engine's.
    #[error("{source}")]
    CacheRequest {
        /// The cache's name.
        cache: String,
        /// Why.
        source: lc_cache::Error,
    },
    /// No configured LUN has this name.
    #[error("no lun {lun:?}")]
    NoLun {
        /// The name asked for.
        lun: String,
    },
    /// No open cache has this name.
    #[error("no cache {cache:?} (known: {known:?})")]
    NoCache {
        /// The name asked for.
        cache: String,
        /// The caches that exist.
        known: Vec<String>,
    },
    /// The LUN's backing device is not attached to its cache.
    #[error("backing device not attached")]
    BackingNotAttached {
        /// The LUN's name.
        lun: String,
    },
    /// Reload refused: a served LUN would be removed or changed.
    #[error("lun {lun}: removed or changed while served; delete its backstore first")]
    ReloadLunServed {
        /// The LUN's name.
        lun: String,
    },
    /// Reload refused: a LUN holding dirty data would be removed or changed.
    #[error("lun {lun}: removed or changed with {dirty} dirty lines; `lc drain {lun}` first")]
    ReloadLunDirty {
        /// The LUN's name.
        lun: String,
        /// Its dirty lines.
        dirty: u64,
    },
    /// Reload refused: a cache's device, O_DIRECT or RAM buffer changed.
    #[error("cache {cache}: device, o_direct or ram_buffer changed; that needs a restart")]
    ReloadNeedsRestart {
        /// The cache's name.
        cache: String,
    },
    /// RECONFIG refused: the new size is not a positive multiple of the block size.
    #[error("dev_size {size} is not a positive multiple of the block size {block_size}")]
    DevSizeNotBlocks {
        /// The size asked for (bytes).
        size: u64,
        /// The LUN's block size.
        block_size: u64,
    },
    /// RECONFIG refused: the new size exceeds the backing device.
    #[error("dev_size {size} exceeds the backing device of lun {lun:?} ({backing_size} bytes)")]
    DevSizeTooLarge {
        /// The size asked for (bytes).
        size: u64,
        /// The LUN's name.
        lun: String,
        /// The backing device's size (bytes).
        backing_size: u64,
    },
    /// RECONFIG refused: a live device cannot switch LUNs.
    #[error(
        "cannot switch a live device from lun {lun:?} to {cfgstring:?}: delete the backstore and create it again"
    )]
    SwitchLun {
        /// The LUN served now.
        lun: String,
        /// The new cfgstring.
        cfgstring: String,
    },
    /// RECONFIG of an attribute lc does not know.
    #[error("unknown reconfiguration")]
    UnknownReconfig,
    /// An event names a uio device this daemon does not serve.
    #[error("device not served by this daemon")]
    NotServed {
        /// The uio device (`uioN`).
        uio: String,
    },
    /// The device's block size is not a multiple of the cache's.
    #[error(
        "hw_block_size {block_size} is not a multiple of cache block size {cache_block_size}; format the cache with --block-size 512 or create the backstore with hw_block_size={cache_block_size}"
    )]
    BlockSize {
        /// The device's `hw_block_size`.
        block_size: u32,
        /// The cache's block size.
        cache_block_size: u32,
    },
    /// A uio device cannot be sized or opened.
    #[error("{source}")]
    Uio {
        /// The uio device (`uioN`).
        uio: String,
        /// Why.
        source: io::Error,
    },
    /// The TCMU devices in sysfs cannot be listed.
    #[error("{0}")]
    ScanDevices(io::Error),
    /// A device's ring is unusable.
    #[error(transparent)]
    Ring(#[from] RingError),
    /// The netlink connection cannot be made.
    #[error("netlink: {0}")]
    Netlink(io::Error),
    /// The metrics listener cannot be bound.
    #[error("metrics_listen {addr}: {source}")]
    Metrics {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: io::Error,
    },
    /// The event loop, the signal set-up or a socket failed.
    #[error(transparent)]
    Io(#[from] io::Error),
    /// The daemon cannot be reached.
    #[error("cannot reach the lc daemon at {}: {source} (is `lc serve` running?)", path.display())]
    Connect {
        /// The control socket.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// The daemon closed the connection without an answer.
    #[error("the daemon closed the connection")]
    Closed,
    /// The daemon's answer is not what the protocol says.
    #[error("bad response {line:?}: {source}")]
    BadResponse {
        /// The line received.
        line: String,
        /// Why it does not parse.
        source: serde_json::Error,
    },
    /// A request cannot be encoded.
    #[error("{0}")]
    Encode(serde_json::Error),
    /// The daemon refused the request with this message.
    #[error("{0}")]
    Refused(String),
    /// A device cannot be opened by `lc format` or `lc check`.
    #[error("cannot open {}: {source}", path.display())]
    OpenDevice {
        /// The device.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// `lc format` found a damaged lc superblock.
    #[error("{source}; refusing to format without --force")]
    DamagedCache {
        /// What the probe found.
        source: lc_cache::Error,
    },
    /// `lc format` found another format's signature.
    #[error("{} holds {what}; formatting destroys it. Check the device name, or pass --force", path.display())]
    ForeignData {
        /// The device.
        path: PathBuf,
        /// What it holds.
        what: &'static str,
    },
    /// `lc format` found an lc cache.
    #[error(
        "{} already holds an lc cache ({nr_segments} segments of {}); formatting destroys its dirty data. \
         Run `lc check` first, drain it, or pass --force",
        path.display(),
        crate::units::human(*segment_size)
    )]
    AlreadyFormatted {
        /// The device.
        path: PathBuf,
        /// Its segments.
        nr_segments: u64,
        /// Their size in bytes.
        segment_size: u64,
    },
    /// `lc format` was not confirmed.
    #[error("not confirmed; nothing written")]
    NotConfirmed,
    /// The engine failed formatting or checking a device.
    #[error(transparent)]
    Engine(#[from] lc_cache::Error),
    /// `--segment-size` is not a size.
    #[error("--segment-size: {0}")]
    SegmentSize(SizeError),
    /// `--segment-size` does not fit 32 bits.
    #[error("--segment-size: segment size {0} too large")]
    SegmentSizeTooLarge(u64),
}

/// `Result` with [`Error`].
pub type Result<T> = std::result::Result<T, Error>;
