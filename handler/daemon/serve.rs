//! `serve`: start-up (signals, caches, netlink, the devices that exist, D-Bus, the
//! control socket and metrics), the main loop, and shutdown in its order.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use slog::{error, info, warn, Logger};

use super::events::pump_netlink;
use super::lun::claim_existing;
use super::{Paths, Shared};
use crate::config::Loaded;
use crate::control::{self, Handler};
use crate::error::{Error, Result};
use crate::event_loop::EventLoop;
use crate::netlink::TcmuNetlink;
use crate::uio;

/// Runs the daemon until SIGTERM/SIGINT.
pub fn serve(cfg: Loaded, paths: Paths, log: Logger) -> Result<()> {
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(sig, stop.clone())?;
    }
    let hup = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGHUP, hup.clone())?;
    // Every signal also writes a byte into this pipe, which the event loop watches: a
    // signal is handled at once, not at the loop's next timer.
    let (sig_rx, sig_tx) = std::os::unix::net::UnixStream::pair()?;
    sig_rx.set_nonblocking(true)?;
    for sig in [
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGHUP,
    ] {
        let tx = sig_tx.try_clone()?;
        signal_hook::low_level::pipe::register(sig, tx)?;
    }
    let io_threads = cfg.daemon.io_threads;
    let socket = cfg.daemon.control_socket.clone();
    let sh = Shared::open(cfg, log.clone())?;
    let mut el = EventLoop::new(io_threads, log.clone())?;
    el.set_busy_poll(Duration::from_micros(sh.t().cfg.daemon.busy_poll_us));
    if sh.t().cfg.daemon.io_uring {
        el.enable_io_uring();
    }
    // Start-up (docs/DESIGN.md "Start-up"): block netlink (a new waited-for command
    // fails with EAGAIN instead of racing the scan), join, serve the devices that exist
    // and answer the enables waiting for a reply, then fail what is still waiting (a
    // REMOVED or RECONFIG a killed predecessor never answered), unblock.
    let blocked = match uio::module_param(&paths.sysfs, "block_netlink", "1") {
        Ok(b) => b,
        Err(e) => {
            warn!(log, "block_netlink failed"; "error" => %e);
            false
        }
    };
    let mut nl = TcmuNetlink::connect().map_err(Error::Netlink)?;
    match nl.set_features(true) {
        Ok(true) => {}
        Ok(false) => warn!(
            log,
            "kernel does not support netlink replies; device creation is not synchronous"
        ),
        Err(e) => warn!(log, "SET_FEATURES failed"; "error" => %e),
    }
    claim_existing(&sh, &paths, &mut el, &mut nl)?;
    if blocked {
        if let Err(e) = uio::module_param(&paths.sysfs, "reset_netlink", "1") {
            warn!(log, "reset_netlink failed"; "error" => %e);
        }
    }
    let _ = uio::module_param(&paths.sysfs, "block_netlink", "0");
    // D-Bus for targetcli: refuse to run beside tcmu-runner (it owns the name).
    let _dbus = if sh.t().cfg.daemon.dbus {
        let sh2 = sh.clone();
        match crate::dbus::DbusService::start(crate::dbus::Bus::System, move |cfg| {
            sh2.t()
                .cfg
                .check_cfgstring(cfg, None, &sh2.active_luns())
                .map(|_| ())
        }) {
            Ok(s) => Some(s),
            Err(e @ crate::dbus::DbusError::NameTaken) => return Err(e.into()),
            Err(e) => {
                warn!(log, "no D-Bus service (targetcli will not list user:lc)"; "error" => %e);
                None
            }
        }
    } else {
        None
    };
    let nl_token = el.add_source(nl.fd())?;
    // Events read while waiting for acknowledgements during start-up are not in the
    // socket any more: no readiness will announce them.
    if nl.has_stashed() {
        pump_netlink(&sh, &paths, &mut el, &mut nl);
    }
    let sig_token = el.add_source(std::os::fd::AsRawFd::as_raw_fd(&sig_rx))?;
    let listener = control::listen(&socket)?;
    let ctl_token = el.add_source(std::os::fd::AsRawFd::as_raw_fd(&listener))?;
    let handler: Arc<dyn Handler> = sh.clone();
    let metrics = match sh.t().cfg.daemon.metrics_listen {
        Some(addr) => {
            let l = std::net::TcpListener::bind(addr)
                .map_err(|source| Error::Metrics { addr, source })?;
            l.set_nonblocking(true)?;
            let token = el.add_source(std::os::fd::AsRawFd::as_raw_fd(&l))?;
            info!(log, "serving metrics"; "listen" => addr.to_string());
            Some((l, token, Arc::new(std::sync::atomic::AtomicUsize::new(0))))
        }
        None => None,
    };
    info!(log, "serving"; "control_socket" => socket.display().to_string());
    // systemd (Type=notify): ready once the control socket listens and every device
    // that existed at start is re-attached. Without NOTIFY_SOCKET this does nothing.
    if let Err(e) = sd_notify::notify(&[sd_notify::NotifyState::Ready]) {
        warn!(log, "sd_notify READY failed"; "error" => %e);
    }
    while !stop.load(Ordering::Relaxed) {
        if hup.swap(false, Ordering::Relaxed) {
            // On its own thread, like a reload from the control socket: a reload may
            // open a cache (a log replay) or wait for a busy device, and the rings keep
            // being served meanwhile. `Shared::reload` runs one reload at a time.
            let (sh, rlog) = (sh.clone(), log.clone());
            let spawned = std::thread::Builder::new()
                .name("lc-reload".into())
                .spawn(move || {
                    let _ = sd_notify::notify(&[sd_notify::NotifyState::Reloading]);
                    if let Err(e) = sh.reload() {
                        error!(rlog, "reload refused; the configuration in force is kept"; "error" => %e);
                    }
                    let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
                });
            if let Err(e) = spawned {
                error!(log, "reload not started: no thread"; "error" => %e);
            }
        }
        let ready = el.run_once(None)?;
        for t in ready {
            if t == sig_token {
                // The flags say which signal; just empty the pipe.
                let mut buf = [0u8; 64];
                while matches!(std::io::Read::read(&mut &sig_rx, &mut buf), Ok(n) if n > 0) {}
            } else if t == nl_token {
                pump_netlink(&sh, &paths, &mut el, &mut nl);
            } else if t == ctl_token {
                control::accept_all(&listener, &handler);
            } else if let Some((l, _, busy)) = metrics.as_ref().filter(|m| m.1 == t) {
                crate::metrics::accept_all(l, &handler, busy);
            }
        }
    }
    info!(log, "stopping");
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    sh.served.lock().unwrap_or_else(|e| e.into_inner()).clear();
    // Every command on a worker is completed and published, and every worker has
    // exited, before the caches close.
    drop(el.shutdown());
    drop(el);
    let _ = std::fs::remove_file(&socket);
    sh.close();
    // Leave the kernel as we found it: with command replies still announced, the next
    // `enable` of a user: device (targetctl restore at boot) would wait in D state
    // for a reply nobody sends.
    match nl.set_features(false) {
        Ok(_) => info!(log, "netlink command replies turned off"),
        Err(e) => warn!(log, "SET_FEATURES (replies off) failed"; "error" => %e),
    }
    Ok(())
}
