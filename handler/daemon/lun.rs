//! The LUN lifecycle: a served device built from its configfs attributes and uio
//! device, attached to the event loop, dropped; the enables left waiting for a reply
//! answered; and at start-up every existing device claimed (re-attached with block,
//! reset, attach, unblock).

use std::sync::Arc;
use std::time::Duration;

use slog::{error, info, warn};

use super::shared::ServedDev;
use super::{Paths, Shared};
use crate::device::Device;
use crate::error::{Error, Result};
use crate::event_loop::EventLoop;
use crate::netlink::{DoneOutcome, EventKind, TcmuNetlink};
use crate::ring::Ring;
use crate::scsi::{LunConfig, LunState};
use crate::uio::{self, UioDevice};

/// Builds the served device for a UIO device (after validating its cfgstring).
fn make_device(sh: &Shared, paths: &Paths, u: &UioDevice, busy_wait: Duration) -> Result<Device> {
    let cfs = &paths.configfs;
    let size = cfs.attrib_u64(u.hba, &u.name, "dev_size");
    let lun = sh
        .t()
        .cfg
        .check_cfgstring(&u.cfgstring, size, &sh.active_luns())?
        .name()
        .to_string();
    let be = sh.lun_backend(&lun)?;
    let size = size.unwrap_or(be.capacity);
    let bs = cfs
        .attrib_u64(u.hba, &u.name, "hw_block_size")
        .unwrap_or(512) as u32;
    let cbs = be.block_size;
    if !bs.is_multiple_of(cbs) {
        return Err(Error::BlockSize {
            block_size: bs,
            cache_block_size: cbs,
        });
    }
    let max_sectors = cfs
        .attrib_u64(u.hba, &u.name, "hw_max_sectors")
        .unwrap_or(128)
        .max(1) as u32;
    let serial = cfs
        .unit_serial(u.hba, &u.name)
        .unwrap_or_else(|| u.name.clone());
    let uio_err = |source| Error::Uio {
        uio: u.uio.clone(),
        source,
    };
    let map_size = uio::map_size(&paths.sysfs, &u.uio).map_err(uio_err)?;
    let mut lc = LunConfig::new(&serial, bs, size / bs as u64);
    // hw_max_sectors is only LIO's advice (the optimal length); the kernel hands over
    // any command that fits the data area, which is the map less the ring (<= 8 MiB).
    lc.opt_transfer_blocks = max_sectors;
    lc.max_transfer_blocks = crate::scsi::max_transfer_for_data_area(
        (map_size as u64).saturating_sub(crate::scsi::MAX_RING_AREA),
        bs,
    );
    let (map, mut bell) = uio::open(&paths.dev, &u.uio, map_size, busy_wait).map_err(uio_err)?;
    bell.set_actions(cfs.dir(u.hba, &u.name).join("action"));
    let ring = Ring::new(map)?;
    Ok(Device::new(
        &format!("{}/{}", u.hba, u.name),
        ring,
        Box::new(bell),
        Arc::new(LunState::new(lc)),
        be.backend,
        sh.log.new(slog::o!("lun" => lun)),
    ))
}

/// Serves a uio device: builds it ([`make_device`]) and adds it to the event loop.
pub(super) fn attach(
    sh: &Shared,
    paths: &Paths,
    el: &mut EventLoop,
    u: &UioDevice,
    busy_wait: Duration,
) -> Result<()> {
    let dev = make_device(sh, paths, u, busy_wait)?;
    let state = dev.lun();
    let token = el.add_device(dev)?;
    let lun = crate::config::lun_name(&u.cfgstring).to_string();
    sh.served
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(ServedDev {
            uio: u.uio.clone(),
            device: format!("{}/{}", u.hba, u.name),
            lun,
            token,
            state,
        });
    Ok(())
}

/// Whether `uio` is served as the configfs device `<hba>/<name>`.
pub(super) fn is_served(sh: &Shared, uio: &str, hba: u32, name: &str) -> bool {
    let device = format!("{hba}/{name}");
    sh.served
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .any(|d| d.uio == uio && d.device == device)
}

/// Stops serving `uio` (if it is served); true if it was.
pub(super) fn drop_served(sh: &Shared, el: &mut EventLoop, uio: &str) -> bool {
    let found = {
        let mut s = sh.served.lock().unwrap_or_else(|e| e.into_inner());
        let i = s.iter().position(|d| d.uio == uio);
        i.map(|i| s.remove(i))
    };
    if let Some(d) = &found {
        el.remove_device(d.token);
    }
    found.is_some()
}

/// Answers an `enable` of a TCMU device that is waiting for ADDED_DEVICE_DONE although
/// no ADDED_DEVICE event reached us (it was sent while no daemon listened: lc was
/// killed with the kernel's reply feature on, `docs/DESIGN.md` "Start-up"). The uio
/// device exists already (`tcmu_configure_device` registers it before it sends the
/// event and waits); the reply must carry the device's `dev_index`, which configfs
/// shows as `statistics/scsi_dev/indx`. Devices of subtype `lc` are attached first and
/// answered 0 (or −EINVAL if lc cannot serve them), others −ENOENT, as the event path
/// does. `busy_wait`: how long to wait for a predecessor still holding the uio device.
fn complete_waiting_enable(
    sh: &Shared,
    paths: &Paths,
    el: &mut EventLoop,
    nl: &mut TcmuNetlink,
    u: &UioDevice,
    busy_wait: Duration,
) {
    let log = &sh.log;
    let dev = format!("{}/{}", u.hba, u.name);
    let id = match paths.configfs.dev_index(u.hba, &u.name) {
        Ok(id) => id,
        Err(e) => {
            error!(log, "cannot answer a waiting enable: its device id is unreadable";
                   "uio" => &u.uio, "device" => &dev, "error" => %e);
            return;
        }
    };
    let status = if u.subtype != "lc" {
        -libc::ENOENT
    } else if is_served(sh, &u.uio, u.hba, &u.name) {
        0
    } else {
        match attach(sh, paths, el, u, busy_wait) {
            Ok(()) => 0,
            Err(e) => {
                error!(log, "refusing device"; "uio" => &u.uio, "device" => &dev, "error" => %e);
                -libc::EINVAL
            }
        }
    };
    let outcome = nl.reply_acked(&EventKind::Added, id, status);
    match &outcome {
        Ok(DoneOutcome::Completed) => {
            info!(log, "answered an enable that was waiting for a daemon"; "uio" => &u.uio,
                  "device" => &dev, "subtype" => &u.subtype, "device_id" => id, "status" => status);
            return;
        }
        Ok(DoneOutcome::NothingPending) => {
            info!(log, "no enable was waiting for this device"; "uio" => &u.uio, "device" => &dev,
                  "device_id" => id)
        }
        Ok(DoneOutcome::Refused(e)) => {
            error!(log, "ADDED_DEVICE_DONE refused"; "uio" => &u.uio, "device" => &dev,
                   "device_id" => id, "errno" => e)
        }
        Err(e) => {
            error!(log, "ADDED_DEVICE_DONE failed"; "uio" => &u.uio, "device" => &dev, "error" => %e)
        }
    }
    // Not completed by us: the write did not wait for a reply (then it finishes on its
    // own, `enable` turns 1) or it is failing (then the kernel unregisters the uio
    // device). Serve the device only in the first case.
    if status == 0 {
        let deadline = std::time::Instant::now() + Duration::from_secs(1);
        let enabled = loop {
            match paths.configfs.enabled(u.hba, &u.name) {
                Ok(true) => break true,
                Ok(false) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50))
                }
                _ => break false,
            }
        };
        if !enabled && drop_served(sh, el, &u.uio) {
            warn!(log, "device not enabled after all; no longer served"; "uio" => &u.uio, "device" => &dev);
        }
    }
}

/// Looks for `enable` writes waiting for a reply nobody will send (the event was lost)
/// and answers them: every TCMU device whose uio device exists, whose configfs `enable`
/// still reads 0, and that is not served yet.
pub(super) fn complete_waiting_enables(
    sh: &Shared,
    paths: &Paths,
    el: &mut EventLoop,
    nl: &mut TcmuNetlink,
) {
    let devs = match uio::scan_tcmu(&paths.sysfs) {
        Ok(d) => d,
        Err(e) => {
            error!(sh.log, "cannot list TCMU devices"; "error" => %e);
            return;
        }
    };
    for u in devs {
        if matches!(paths.configfs.enabled(u.hba, &u.name), Ok(false))
            && !is_served(sh, &u.uio, u.hba, &u.name)
        {
            complete_waiting_enable(sh, paths, el, nl, &u, Duration::ZERO);
        }
    }
}

/// Start-up (`docs/DESIGN.md` "Start-up"), with `block_netlink` set: serves every TCMU
/// device that exists. A configured device of subtype `lc` is re-attached (block,
/// reset the ring, attach, unblock: `docs/TCMU.md` §6.4); a device whose `enable` is
/// still waiting is answered ([`complete_waiting_enable`]); a device whose configfs
/// directory is gone (being removed) is left alone.
pub(super) fn claim_existing(
    sh: &Shared,
    paths: &Paths,
    el: &mut EventLoop,
    nl: &mut TcmuNetlink,
) -> Result<()> {
    let log = &sh.log;
    let cfs = &paths.configfs;
    for u in uio::scan_tcmu(&paths.sysfs).map_err(Error::ScanDevices)? {
        let dev = format!("{}/{}", u.hba, u.name);
        match cfs.enabled(u.hba, &u.name) {
            Err(e) => {
                warn!(log, "TCMU device without a readable configfs enable (being removed?); left alone";
                      "uio" => &u.uio, "device" => &dev, "error" => %e);
            }
            // A device that exists already may still be held by a predecessor that is
            // dying (killed in the middle of a long flush).
            Ok(false) => complete_waiting_enable(sh, paths, el, nl, &u, Duration::from_secs(20)),
            Ok(true) if u.subtype == "lc" => {
                let blocked = cfs.action(u.hba, &u.name, "block_dev", "1");
                let reset = cfs.action(u.hba, &u.name, "reset_ring", "1");
                info!(log, "re-attaching existing device"; "uio" => &u.uio, "device" => &dev,
                      "block_dev" => format!("{blocked:?}"), "reset_ring" => format!("{reset:?}"));
                if let Err(e) = attach(sh, paths, el, &u, Duration::from_secs(20)) {
                    error!(log, "cannot serve existing device"; "uio" => &u.uio, "error" => %e);
                }
                if let Err(e) = cfs.action(u.hba, &u.name, "block_dev", "0") {
                    error!(log, "unblocking device failed"; "uio" => &u.uio, "error" => %e);
                }
            }
            Ok(true) => {}
        }
    }
    Ok(())
}
