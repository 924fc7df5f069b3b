//! The engine's error type: every variant names the device, offset or key involved.

use std::io;
use std::sync::Arc;

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
    /// evidence while data it held is lost. A rewrite of the lost data needs log space
    /// too, so only accepting the loss lets writes go on.
    #[error("cache log full up to damaged segment {segment}, kept while data it held is lost; run `lc accept-loss` to let writes continue")]
    LogBlocked {
        /// The first damaged segment id.
        segment: u64,
    },
    /// Writeback to this backing device has been failing for longer than
    /// `writeback_fail_timeout_s`: writes that need it to make progress are refused
    /// rather than left waiting. Its dirty data stays in the cache.
    #[error("backing device {dev}: writeback failing for {secs} s ({source}); write refused")]
    BackingFailed {
        /// Backing device id.
        dev: u8,
        /// Seconds since writeback to it first failed.
        secs: u64,
        /// The last writeback error (an [`Error::Io`] on that device: its offset there
        /// and the `io::Error`).
        source: Arc<Error>,
    },
    /// A superblock commit asked for (`Cache::commit_superblock`) failed on the cache
    /// device: the superblock there is the previous one.
    #[error("superblock commit failed: {0}")]
    Superblock(#[source] Arc<Error>),
    /// A segment read back for writeback or cleaning failed its checks: the line copies
    /// in `slots` do not hold what was written (`None`: its header is unreadable, so
    /// every copy in it). Not a cache failure: the engine records the live ones as
    /// damage (docs/FORMAT.md, "Damage found while serving").
    #[error("{device}: segment {segment} failed its checks for writeback or cleaning: {}", rot_text(.slots))]
    Rotten {
        /// The cache device.
        device: String,
        /// The segment id.
        segment: u64,
        /// The line slots whose copy failed, ascending (`None`: the header failed).
        slots: Option<Vec<usize>>,
    },
    /// The cache stopped accepting writes: an unrecoverable cache-device error, or it is
    /// closing or was killed.
    #[error("cache failed: {0}")]
    Failed(#[source] Failure),
}

/// Why a cache stopped accepting writes (carried by [`Error::Failed`]).
#[derive(Clone, Debug, thiserror::Error)]
pub enum Failure {
    /// The cache device failed a write or flush of the log, a checkpoint or the
    /// superblock, or a read the writeback thread or the cleaner needed: the error it
    /// returned (an [`Error::Io`] with the cache device's offset and the `io::Error`).
    /// A segment that reads back but fails its checks ([`Error::Rotten`]) is damage,
    /// not a failure.
    #[error(transparent)]
    Device(Arc<Error>),
    /// The cache was killed (`Cache::kill`, tests and benchmarks).
    #[error("killed")]
    Killed,
    /// The cache is closing: its flusher has exited and nothing more becomes durable.
    #[error("the cache is closing")]
    Closing,
}

impl From<Error> for Failure {
    fn from(e: Error) -> Self {
        Failure::Device(Arc::new(e))
    }
}

fn rot_text(slots: &Option<Vec<usize>>) -> String {
    match slots {
        None => "no readable header of it".into(),
        Some(s) if s.len() == 1 => format!("line {} checksum mismatch", s[0]),
        Some(s) => format!("lines {s:?} checksum mismatch"),
    }
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

    /// The device error behind this one: the `io::Error` of an [`Error::Io`], also
    /// when it is the cause of a [`Error::BackingFailed`], an [`Error::Superblock`] or a
    /// [`Failure::Device`].
    pub fn io_error(&self) -> Option<&io::Error> {
        match self {
            Error::Io { source, .. } => Some(source),
            Error::BackingFailed { source, .. }
            | Error::Superblock(source)
            | Error::Failed(Failure::Device(source)) => source.io_error(),
            _ => None,
        }
    }

    /// A copy of an [`Error::Io`] (the `io::Error` rebuilt from its OS error code, or
    /// its kind and text), for recording as a failure while returning the original.
    pub(crate) fn copy_io(&self) -> Option<Error> {
        let Error::Io {
            device,
            offset,
            source,
        } = self
        else {
            return None;
        };
        let source = match source.raw_os_error() {
            Some(code) => io::Error::from_raw_os_error(code),
            None => io::Error::new(source.kind(), source.to_string()),
        };
        Some(Error::Io {
            device: device.clone(),
            offset: *offset,
            source,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn eio() -> Error {
        Error::io("/dev/x", 4096, io::Error::from_raw_os_error(libc::EIO))
    }

    #[test]
    fn a_rotten_segment_names_its_lines_or_its_header() {
        let e = |slots| Error::Rotten {
            device: "ssd".into(),
            segment: 2,
            slots,
        };
        assert_eq!(
            e(Some(vec![100])).to_string(),
            "ssd: segment 2 failed its checks for writeback or cleaning: line 100 checksum mismatch"
        );
        assert!(e(Some(vec![1, 5]))
            .to_string()
            .ends_with("lines [1, 5] checksum mismatch"));
        assert!(e(None).to_string().ends_with("no readable header of it"));
    }

    #[test]
    fn failures_keep_their_cause_typed_and_their_text() {
        let io_text = eio().to_string();
        let e = Error::Failed(eio().into());
        assert_eq!(e.to_string(), format!("cache failed: {io_text}"));
        assert_eq!(e.io_error().and_then(|e| e.raw_os_error()), Some(libc::EIO));
        assert_eq!(
            Error::Failed(Failure::Killed).to_string(),
            "cache failed: killed"
        );
        let b = Error::BackingFailed {
            dev: 3,
            secs: 7,
            source: Arc::new(eio()),
        };
        assert_eq!(
            b.to_string(),
            format!("backing device 3: writeback failing for 7 s ({io_text}); write refused")
        );
        assert_eq!(b.io_error().and_then(|e| e.raw_os_error()), Some(libc::EIO));
    }

    #[test]
    fn a_copied_io_error_reads_the_same() {
        let e = eio();
        let c = e.copy_io().expect("an Io error");
        assert_eq!(c.to_string(), e.to_string());
        assert_eq!(c.io_offset(), Some(4096));
        let custom = Error::io("/dev/y", 0, io::Error::other("power cut"));
        assert_eq!(custom.copy_io().unwrap().to_string(), custom.to_string());
        assert!(Error::Failed(Failure::Closing).copy_io().is_none());
    }
}
