//! Netlink event dispatch: each TCMU device event (added, removed, reconfigured) is
//! acted on and answered; lost events send the daemon looking for waiting enables.

use std::time::Duration;

use slog::{error, info, warn};

use super::lun::{attach, complete_waiting_enables, drop_served, is_served};
use super::reconfig::reconfigure;
use super::{Paths, Shared};
use crate::error::Error;
use crate::event_loop::EventLoop;
use crate::netlink::{Event, EventKind, Reconfig, TcmuNetlink};
use crate::uio::{self, UioDevice};

/// Hands every received netlink event to [`handle_event`] (bad messages are logged).
pub(super) fn pump_netlink(sh: &Shared, paths: &Paths, el: &mut EventLoop, nl: &mut TcmuNetlink) {
    match nl.recv_events() {
        Ok(evs) => {
            for ev in evs {
                match ev {
                    Ok(ev) => handle_event(sh, paths, el, nl, ev),
                    Err(e) => warn!(sh.log, "bad netlink message"; "error" => %e),
                }
            }
        }
        // The socket overflowed: events were dropped, and a writer may wait for a reply
        // to one of them.
        Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {
            warn!(
                sh.log,
                "netlink events lost (receive buffer full); looking for waiting enables"
            );
            complete_waiting_enables(sh, paths, el, nl);
        }
        Err(e) => error!(sh.log, "netlink receive failed"; "error" => %e),
    }
}

fn handle_event(sh: &Shared, paths: &Paths, el: &mut EventLoop, nl: &mut TcmuNetlink, ev: Event) {
    let parsed = uio::parse_name(&ev.device);
    let status = match &ev.kind {
        EventKind::Added => match parsed {
            // Attached already (found waiting at start-up, before its event was read).
            Some((hba, name, st, _))
                if st == "lc" && is_served(sh, &format!("uio{}", ev.minor), hba, &name) =>
            {
                0
            }
            Some((hba, name, st, cfgstring)) if st == "lc" => {
                let u = UioDevice {
                    uio: format!("uio{}", ev.minor),
                    hba,
                    name,
                    subtype: st,
                    cfgstring,
                };
                match attach(sh, paths, el, &u, Duration::ZERO) {
                    Ok(()) => 0,
                    Err(e) => {
                        error!(sh.log, "refusing device"; "device" => &ev.device, "error" => %e);
                        -libc::EINVAL
                    }
                }
            }
            // Not ours: like tcmu-runner, refuse so the creation fails visibly.
            _ => -libc::ENOENT,
        },
        EventKind::Removed => {
            drop_served(sh, el, &format!("uio{}", ev.minor));
            0
        }
        EventKind::Reconfig(change) => {
            let uio = format!("uio{}", ev.minor);
            let served = sh
                .served
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .find(|d| d.uio == uio)
                .cloned();
            let r = match served {
                None => Err(Error::NotServed { uio }),
                Some(d) => match sh.lun_capacity(&d.lun) {
                    None => Err(Error::BackingNotAttached { lun: d.lun.clone() }),
                    Some(b) => reconfigure(&d.state, &d.lun, b, change),
                },
            };
            match r {
                Ok(what) => {
                    info!(sh.log, "device reconfigured"; "device" => &ev.device, "change" => what);
                    0
                }
                Err(e) => {
                    error!(sh.log, "reconfiguration refused"; "device" => &ev.device, "error" => %e);
                    match change {
                        Reconfig::Size(_) => -libc::EINVAL,
                        _ => -libc::EOPNOTSUPP,
                    }
                }
            }
        }
        EventKind::Other(_) => return,
    };
    if let Err(e) = nl.reply(&ev, status) {
        error!(sh.log, "netlink reply failed"; "error" => %e);
    }
}
