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

    /// The failing byte offset of an I/O error on a backing device, if known.
    pub fn io_offset(&self) -> Option<u64> {
        match self {
            Error::Io { offset, .. } => Some(*offset),
            _ => None,
        }
    }
}
