//! `lc serve`: opens the configured caches, claims every TCMU device of subtype `lc`
//! (those that exist at start-up, re-attached with the block/reset/attach/unblock
//! sequence of `docs/TCMU.md` §6.4; those whose `enable` is still waiting for a reply,
//! answered (`docs/DESIGN.md` "Start-up"); and those announced later over netlink), serves
//! them from the event loop, and answers the control socket. On SIGTERM/SIGINT it
//! stops taking commands, lets in-flight ones finish (up to a bound, logging what is
//! still running then), completes them on their rings, stops the I/O workers, and
//! only then closes the caches.
//!
//! One concern per module (the kernel's paths are `crate::paths`): `shared` the
//! state control threads share (caches, LUN tables, served devices), `open` opening
//! caches and backing devices, `reload` the configuration reload policy,
//! `requests` what each control request does, `lun` the LUN lifecycle (a served
//! device built from configfs, attached, re-attached at start-up, dropped),
//! `reconfig` the RECONFIG policy, `events` netlink event dispatch, `serve`
//! the main loop and shutdown.

mod events;
mod lun;
mod open;
mod reconfig;
mod reload;
mod requests;
mod serve;
mod shared;

pub use crate::paths::Paths;
pub use serve::serve;
pub use shared::{LunBackend, Shared};
