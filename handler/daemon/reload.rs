//! Reloading the configuration (SIGHUP, `lc reload`): what may change while the
//! daemon runs, what is refused, and the order in which the new tables are built and
//! put in force.

use std::collections::HashMap;
use std::sync::Arc;

use slog::{error, info, warn};

use lc_cache::Cache;

use super::open::{open_backing, open_cache};
use super::shared::{lun_map, Shared, Tables};
use crate::config::LunSection;
use crate::error::{Error, Result};

/// True when `luns` holds `l` unchanged (same name, cache, backing device and id).
fn listed(luns: &[LunSection], l: &LunSection) -> bool {
    luns.iter().any(|n| {
        n.name == l.name
            && n.cache == l.cache
            && n.backing == l.backing
            && n.backing_id == l.backing_id
    })
}

impl Shared {
    /// Re-reads the configuration file (SIGHUP, `lc reload`). New caches and LUNs come
    /// up, tunables and the log level change; a removed or changed LUN is refused while
    /// it is served or holds dirty data (drain it first), a cache whose device or RAM
    /// changes needs a restart. Refused as a whole, with the old configuration kept,
    /// when anything is refused or the file is bad. Returns what changed.
    pub fn reload(&self) -> Result<Vec<String>> {
        let _one = self.reloading.lock().unwrap_or_else(|e| e.into_inner());
        let old = self.t();
        let new = crate::config::load(&old.cfg.path)?;
        let served = self.active_luns();
        let mut changes = Vec::new();
        let dirty = |cache: &Cache, id: u8| {
            cache
                .stats()
                .dirty_lines
                .iter()
                .find(|(d, _)| *d == id)
                .map_or(0, |x| x.1)
        };
        // 1. Refusals, before anything changes.
        for l in &old.cfg.luns {
            if listed(&new.luns, l) {
                continue;
            }
            if served.contains(&l.name) {
                return Err(Error::ReloadLunServed {
                    lun: l.name.clone(),
                });
            }
            let n = dirty(&old.caches[&l.cache], l.backing_id);
            if n > 0 {
                return Err(Error::ReloadLunDirty {
                    lun: l.name.clone(),
                    dirty: n,
                });
            }
        }
        for r in &old.cfg.ram_luns {
            if !new.ram_luns.contains(r) && served.contains(&r.name) {
                return Err(Error::ReloadLunServed {
                    lun: r.name.clone(),
                });
            }
        }
        for c in &old.cfg.caches {
            match new.caches.iter().find(|n| n.section.name == c.section.name) {
                Some(n)
                    if n.section.device != c.section.device
                        || n.section.o_direct != c.section.o_direct
                        || n.ram_bytes != c.ram_bytes =>
                {
                    return Err(Error::ReloadNeedsRestart {
                        cache: c.section.name.clone(),
                    })
                }
                _ => {}
            }
        }
        // 2. Open what is new (nothing is changed if any of it fails).
        let mut caches = HashMap::new();
        for c in &new.caches {
            match old.caches.get(&c.section.name) {
                Some(k) => {
                    caches.insert(c.section.name.clone(), k.clone());
                }
                None => {
                    caches.insert(c.section.name.clone(), open_cache(c, &new.luns, &self.log)?);
                    changes.push(format!("cache {} opened", c.section.name));
                }
            }
        }
        let mut attach = Vec::new();
        for l in &new.luns {
            if listed(&old.cfg.luns, l) || !old.caches.contains_key(&l.cache) {
                continue; // unchanged, or opened with its new cache above
            }
            let c = new.caches.iter().find(|c| c.section.name == l.cache);
            let direct = c.is_some_and(|c| c.section.o_direct);
            attach.push((l.cache.clone(), open_backing(l, direct, &self.log)?));
        }
        // 3. Apply.
        for l in &old.cfg.luns {
            if !listed(&new.luns, l) {
                if let Some(c) = caches.get(&l.cache) {
                    c.detach_backing(l.backing_id)
                        .map_err(|source| Error::Lun {
                            lun: l.name.clone(),
                            source,
                        })?;
                }
                changes.push(format!("lun {} removed", l.name));
            }
        }
        for r in &old.cfg.ram_luns {
            if !new.ram_luns.contains(r) {
                changes.push(format!("ram lun {} removed", r.name));
            }
        }
        for r in &new.ram_luns {
            if !old.cfg.ram_luns.contains(r) {
                changes.push(format!("ram lun {} added", r.name));
            }
        }
        for (cache, b) in attach {
            let name = b.label.clone();
            caches[&cache]
                .attach_backing(b)
                .map_err(|source| Error::Lun {
                    lun: name.clone(),
                    source,
                })?;
            changes.push(format!("lun {name} added"));
        }
        for c in &new.caches {
            let Some(o) = old
                .cfg
                .caches
                .iter()
                .find(|o| o.section.name == c.section.name)
            else {
                continue;
            };
            for ((k, v), (_, was)) in c.tunables.list().into_iter().zip(o.tunables.list()) {
                if v != was {
                    caches[&c.section.name]
                        .set_tunable(k, &v)
                        .map_err(|source| Error::Cache {
                            cache: c.section.name.clone(),
                            source,
                        })?;
                    changes.push(format!("cache {}: {k} = {v}", c.section.name));
                }
            }
        }
        for c in &old.cfg.caches {
            if !caches.contains_key(&c.section.name) {
                let cache = &old.caches[&c.section.name];
                if let Err(e) = cache.seal_now().and_then(|_| cache.commit_superblock()) {
                    error!(self.log, "closing a removed cache failed"; "cache" => &c.section.name, "error" => %e);
                }
                changes.push(format!("cache {} closed", c.section.name));
            }
        }
        if new.daemon.log_level != old.cfg.daemon.log_level {
            crate::cli::set_log_level(&new.daemon.log_level);
            changes.push(format!("log_level = {}", new.daemon.log_level));
        }
        for (what, changed) in [
            (
                "control_socket",
                new.daemon.control_socket != old.cfg.daemon.control_socket,
            ),
            (
                "io_threads",
                new.daemon.io_threads != old.cfg.daemon.io_threads,
            ),
            (
                "busy_poll_us",
                new.daemon.busy_poll_us != old.cfg.daemon.busy_poll_us,
            ),
            ("io_uring", new.daemon.io_uring != old.cfg.daemon.io_uring),
            ("dbus", new.daemon.dbus != old.cfg.daemon.dbus),
        ] {
            if changed {
                warn!(self.log, "reload: [daemon] key changes at the next restart"; "key" => what);
            }
        }
        let luns = lun_map(&new);
        *self.tables.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(Tables {
            cfg: new,
            caches,
            luns,
        });
        info!(self.log, "configuration reloaded"; "changes" => format!("{changes:?}"));
        Ok(changes)
    }
}
