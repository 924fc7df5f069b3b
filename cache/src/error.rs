//! The engine's error type: every variant names the device, offset or key involved.

use std::io;

/// Errors returned by the cache engine.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An I/O error on a device, with the byte offset of the failing request.
    #[error("{device}: I/O error at byte offset {offset}: {source}")]
    Io {
        /// Which device failed (its description).
        device: String,
        /// Byte offset of the failing request on that device.
        offset: u64,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The cache device does not hold lc data of a format this build understands.
    #[error("{device}: {reason}")]
    BadFormat {
        /// The cache device.
        device: String,
        /// What is wrong.
        reason: String,
    },
    /// The cache device holds lc data of another format version.
    #[error(
        "{device}: format version {version}, this build reads versions {} to {}",
        crate::format::OLDEST_VERSION,
        crate::format::FORMAT_VERSION
    )]
    Version {
        /// The cache device.
        device: String,
        /// The version found.
        version: u32,
    },
    /// A caller passed an invalid argument (unaligned offset, unknown device id, ...).
    #[error("invalid argument: {0}")]
    Invalid(String),
    /// A tunable name or value was refused.
    #[error("tunable {key}: {reason}")]
    Tunable {
        /// The tunable's name.
        key: String,
        /// Why the value was refused.
        reason: String,
    },
    /// The newest durable copy of this data was in a damaged log segment: it is lost,
    /// and the older data is not returned in its place (see `lc accept-loss`).
    #[error("backing device {dev}: data at byte offset {offset} was lost to cache-device damage")]
    Lost {
        /// Backing device id.
        dev: u8,
        /// Byte offset of the first lost line touched by the request.
        offset: u64,
    },
    /// Writes cannot proceed: the log is full up to a damaged segment that is kept as
    /// evidence while data it held is lost (rewrite the lost data or accept the loss).
    #[error("cache log full up to damaged segment {segment}; rewrite the lost data or run `lc accept-loss`")]
    LogBlocked {
        /// The first damaged segment id.
        segment: u64,
    },
    /// Writeback to this backing device has been failing for longer than
    /// `writeback_fail_timeout_s`: writes that need it to make progress are refused
    /// rather than left waiting. Its dirty data stays in the cache.
    #[error("backing device {dev}: writeback failing for {secs} s ({reason}); write refused")]
    BackingFailed {
        /// Backing device id.
        dev: u8,
        /// Seconds since writeback to it first failed.
        secs: u64,
        /// The last writeback error.
        reason: String,
    },
    /// The engine stopped accepting writes after an unrecoverable cache-device error.
    #[error("cache failed: {0}")]
    Failed(String),
}

/// Result alias for the engine.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// Wraps an I/O error with the device and offset it happened at.
    pub fn io(device: &str, offset: u64, source: io::Error) -> Self {
        Error::Io {
            device: device.to_string(),
            offset,
            source,
        }
    }

    /// The failing byte offset of an I/O error on a backing device, or of lost data,
    /// if known.
    pub fn io_offset(&self) -> Option<u64> {
        match self {
            Error::Io { offset, .. } | Error::Lost { offset, .. } => Some(*offset),
            _ => None,
        }
    }
}
