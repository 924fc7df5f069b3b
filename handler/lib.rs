//! The lc daemon and command-line tool: everything LIO-facing (TCMU ring, netlink,
//! SCSI emulation, D-Bus) and the administration commands, built on the `lc-cache`
//! engine.

pub mod admin;
pub mod api;
pub mod cli;
pub mod config;
pub mod control;
pub mod daemon;
pub mod dbus;
pub mod device;
#[cfg(feature = "test-utils")]
pub mod emulator;
pub mod error;
pub mod event_loop;
pub mod man;
pub mod metrics;
pub mod netlink;
pub mod paths;
pub mod ram;
pub mod ring;
pub mod scsi;
pub mod shm;
#[path = "../sys/mod.rs"]
pub mod sys;
pub mod uio;
pub mod units;
pub mod workers;

pub use error::{Error, Result};
