//! The daemon's state shared by the event loop and the control threads: the
//! configuration in force with its open caches and LUN table (replaced whole by a
//! reload), and the devices being served.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};

use slog::{error, Logger};

use lc_cache::Cache;

use super::open::open_cache;
use crate::config::Loaded;
use crate::device::EngineBackend;
use crate::error::{Error, Result};
use crate::ram::RamBackend;
use crate::scsi::{BlockBackend, LunState};

/// A LUN as the daemon knows it.
#[derive(Clone)]
pub(super) struct LunInfo {
    pub(super) cache: String,
    pub(super) id: u8,
}

/// What serves a new device's blocks ([`Shared::lun_backend`]).
pub struct LunBackend {
    /// The backend.
    pub backend: Arc<dyn BlockBackend>,
    /// The largest capacity in bytes: the backing device's size, or a RAM LUN's `size`.
    pub capacity: u64,
    /// The LUN's block size must be a multiple of this (the cache's block size; 512
    /// for RAM).
    pub block_size: u32,
}

/// A TCMU device being served.
#[derive(Clone, Debug)]
pub(super) struct ServedDev {
    /// `uioN`.
    pub(super) uio: String,
    /// `<hba>/<name>` of its configfs directory `core/user_<hba>/<name>`.
    pub(super) device: String,
    /// The LUN it serves.
    pub(super) lun: String,
    /// Its event loop token.
    pub(super) token: usize,
    /// Its capacity and write cache, changed by RECONFIG events.
    pub(super) state: Arc<LunState>,
}

/// What a configuration made: the config, its open caches, and where each LUN lives.
/// A reload replaces it whole (readers keep the one they took).
pub(super) struct Tables {
    pub(super) cfg: Loaded,
    pub(super) caches: HashMap<String, Arc<Cache>>,
    pub(super) luns: HashMap<String, LunInfo>,
}

/// The daemon's state shared with control threads.
pub struct Shared {
    pub(super) tables: RwLock<Arc<Tables>>,
    /// Serialises reloads.
    pub(super) reloading: Mutex<()>,
    pub(super) served: Mutex<Vec<ServedDev>>,
    pub(super) log: Logger,
}

pub(super) fn lun_map(cfg: &Loaded) -> HashMap<String, LunInfo> {
    cfg.luns
        .iter()
        .map(|l| {
            (
                l.name.clone(),
                LunInfo {
                    cache: l.cache.clone(),
                    id: l.backing_id,
                },
            )
        })
        .collect()
}

impl Shared {
    /// Opens every configured cache with its backing devices.
    pub fn open(cfg: Loaded, log: Logger) -> Result<Arc<Shared>> {
        let mut caches = HashMap::new();
        for c in &cfg.caches {
            caches.insert(c.section.name.clone(), open_cache(c, &cfg.luns, &log)?);
        }
        let luns = lun_map(&cfg);
        Ok(Arc::new(Shared {
            tables: RwLock::new(Arc::new(Tables { cfg, caches, luns })),
            reloading: Mutex::new(()),
            served: Mutex::new(Vec::new()),
            log,
        }))
    }

    pub(super) fn t(&self) -> Arc<Tables> {
        self.tables
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The configuration in force.
    pub fn config(&self) -> Loaded {
        self.t().cfg.clone()
    }

    /// The cache and backing id serving `lun`.
    pub fn lun_cache(&self, lun: &str) -> Option<(Arc<Cache>, u8)> {
        let t = self.t();
        let l = t.luns.get(lun)?;
        Some((t.caches.get(&l.cache)?.clone(), l.id))
    }

    /// A backend for a new device of `lun`: the cache engine for its backing device,
    /// or new, empty memory for a RAM LUN (`backend = "ram"`).
    pub fn lun_backend(&self, lun: &str) -> Result<LunBackend> {
        if let Some(r) = self.t().cfg.ram_luns.iter().find(|r| r.name == lun) {
            return Ok(LunBackend {
                backend: Arc::new(RamBackend::new(r.size)),
                capacity: r.size,
                block_size: 512,
            });
        }
        let (cache, id) = self.lun_cache(lun).ok_or_else(|| Error::NoLun {
            lun: lun.to_string(),
        })?;
        let capacity = cache
            .backing_size(id)
            .ok_or_else(|| Error::BackingNotAttached {
                lun: lun.to_string(),
            })?;
        let block_size = cache.geometry().block_size;
        Ok(LunBackend {
            backend: Arc::new(EngineBackend { cache, dev: id }),
            capacity,
            block_size,
        })
    }

    /// The largest capacity of a device of `lun` (bytes), None when it has none now.
    pub(super) fn lun_capacity(&self, lun: &str) -> Option<u64> {
        if let Some(r) = self.t().cfg.ram_luns.iter().find(|r| r.name == lun) {
            return Some(r.size);
        }
        self.lun_cache(lun).and_then(|(c, id)| c.backing_size(id))
    }

    pub(super) fn cache(&self, name: &str) -> Result<Arc<Cache>> {
        let t = self.t();
        t.caches.get(name).cloned().ok_or_else(|| Error::NoCache {
            cache: name.to_string(),
            known: t.caches.keys().cloned().collect(),
        })
    }

    pub(super) fn active_luns(&self) -> Vec<String> {
        self.served
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|s| s.lun.clone())
            .collect()
    }

    /// Closes every cache (flush + superblock commit).
    pub fn close(&self) {
        for (name, c) in &self.t().caches {
            if let Err(e) = c.seal_now().and_then(|_| c.commit_superblock()) {
                error!(self.log, "closing cache failed"; "cache" => name, "error" => %e);
            }
        }
    }
}
