//! `lc serve`: opens the configured caches, claims every TCMU device of subtype `lc`
//! (those that exist at start-up, re-attached with the block/reset/attach/unblock
//! sequence of `docs/TCMU.md` §6.4; those whose `enable` is still waiting for a reply,
//! answered (`docs/DESIGN.md` "Start-up"); and those announced later over netlink), serves
//! them from the event loop, and answers the control socket. On SIGTERM/SIGINT it
//! stops taking commands, lets in-flight ones finish (up to a bound, logging what is
//! still running then), completes them on their rings, stops the I/O workers, and
//! only then closes the caches.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use serde_json::{json, Value};
use slog::{error, info, warn, Logger};

use lc_cache::{Backing, BlockDevice, Cache, FileDevice, OpenOptions};

use crate::config::{CacheConfig, Loaded, LunSection};
use crate::control::{self, Handler, Request};
use crate::device::{Device, EngineBackend};
use crate::event_loop::EventLoop;
use crate::netlink::{DoneOutcome, Event, Reconfig, TcmuNetlink};
use crate::ram::RamBackend;
use crate::ring::Ring;
use crate::scsi::{BlockBackend, LunConfig, LunState};
use crate::sys;
use crate::uio::{self, Configfs, UioDevice};

/// Where the kernel's files are (parameters so tests can point elsewhere).
#[derive(Clone, Debug)]
pub struct Paths {
    /// sysfs root, `/sys`.
    pub sysfs: PathBuf,
    /// Device nodes, `/dev`.
    pub dev: PathBuf,
    /// configfs target core, `/sys/kernel/config/target/core`.
    pub configfs: Configfs,
}

impl Default for Paths {
    fn default() -> Self {
        Paths {
            sysfs: PathBuf::from("/sys"),
            dev: PathBuf::from("/dev"),
            configfs: Configfs::default(),
        }
    }
}

/// A LUN as the daemon knows it.
#[derive(Clone)]
struct LunInfo {
    cache: String,
    id: u8,
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
struct ServedDev {
    uio: String,
    /// `<hba>/<name>` of its configfs directory `core/user_<hba>/<name>`.
    device: String,
    lun: String,
    token: usize,
    /// Its capacity and write cache, changed by RECONFIG events.
    state: Arc<LunState>,
}

/// Applies a RECONFIG event (a live write of `attrib/dev_size`,
/// `attrib/emulate_write_cache` or `attrib/dev_config`) to a served LUN and says what
/// changed; an error refuses the change (the kernel then fails the attribute write
/// and keeps the old value).
fn reconfigure(
    state: &LunState,
    lun: &str,
    backing_size: u64,
    change: Option<&Reconfig>,
) -> Result<String, String> {
    match change {
        Some(Reconfig::Size(size)) => {
            let bs = state.cfg.block_size as u64;
            if *size == 0 || size % bs != 0 {
                return Err(format!(
                    "dev_size {size} is not a positive multiple of the block size {bs}"
                ));
            }
            if *size > backing_size {
                return Err(format!(
                    "dev_size {size} exceeds the backing device of lun {lun:?} ({backing_size} bytes)"
                ));
            }
            state.resize(size / bs);
            Ok(format!("capacity now {} blocks of {bs} bytes", size / bs))
        }
        Some(Reconfig::WriteCache(on)) => {
            state.set_write_cache(*on);
            Ok(format!("write cache {}", if *on { "on" } else { "off" }))
        }
        Some(Reconfig::Config(c)) => {
            if crate::config::lun_name(c) == lun {
                Ok("cfgstring unchanged".into())
            } else {
                Err(format!(
                    "cannot switch a live device from lun {lun:?} to {:?}: delete the backstore and create it again",
                    c.trim_end_matches('\n')
                ))
            }
        }
        Some(Reconfig::Unknown) | None => Err("unknown reconfiguration".into()),
    }
}

/// Opens a cache or backing device for the daemon's exclusive use. A device still busy
/// is asked for again for a while: a predecessor killed a moment ago holds its devices
/// until its last thread leaves the kernel (a long flush on a slow disk).
fn open_exclusive(
    path: &std::path::Path,
    direct: bool,
    log: &Logger,
) -> std::io::Result<FileDevice> {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let mut said = false;
    loop {
        match FileDevice::open_exclusive(path, direct) {
            Err(e)
                if e.kind() == std::io::ErrorKind::ResourceBusy
                    && std::time::Instant::now() < deadline =>
            {
                if !said {
                    warn!(log, "device busy, waiting up to 20 s for it"; "device" => path.display().to_string());
                    said = true;
                }
                std::thread::sleep(Duration::from_millis(200));
            }
            r => return r,
        }
    }
}

/// What a configuration made: the config, its open caches, and where each LUN lives.
/// A reload replaces it whole (readers keep the one they took).
struct Tables {
    cfg: Loaded,
    caches: HashMap<String, Arc<Cache>>,
    luns: HashMap<String, LunInfo>,
}

/// The daemon's state shared with control threads.
pub struct Shared {
    tables: RwLock<Arc<Tables>>,
    /// Serialises reloads.
    reloading: Mutex<()>,
    served: Mutex<Vec<ServedDev>>,
    log: Logger,
}

/// Opens a LUN's backing device for a cache.
fn open_backing(l: &LunSection, direct: bool, log: &Logger) -> Result<Backing, String> {
    let dev: Arc<dyn BlockDevice> = Arc::new(
        open_exclusive(&l.backing, direct, log).map_err(|e| format!("lun {}: {e}", l.name))?,
    );
    Ok(Backing {
        id: l.backing_id,
        dev,
        label: l.name.clone(),
    })
}

/// Opens one configured cache with the backing devices of its LUNs.
fn open_cache(c: &CacheConfig, luns: &[LunSection], log: &Logger) -> Result<Arc<Cache>, String> {
    let s = &c.section;
    let dev: Arc<dyn BlockDevice> = Arc::new(
        open_exclusive(&s.device, s.o_direct, log).map_err(|e| format!("cache {}: {e}", s.name))?,
    );
    let backing = luns
        .iter()
        .filter(|l| l.cache == s.name)
        .map(|l| open_backing(l, s.o_direct, log))
        .collect::<Result<Vec<_>, String>>()?;
    let (cache, report) = Cache::open(
        dev,
        backing,
        OpenOptions {
            ram_bytes: c.ram_bytes,
            tunables: c.tunables.clone(),
            logger: log.new(slog::o!("cache" => s.name.clone())),
        },
    )
    .map_err(|e| format!("cache {}: {e}", s.name))?;
    if !report.damaged.is_empty() {
        error!(log, "cache log damaged: reads of lost data fail until rewritten or `lc accept-loss`";
               "cache" => &s.name, "segments" => format!("{:?}", report.damaged));
    }
    Ok(Arc::new(cache))
}

/// True when `luns` holds `l` unchanged (same name, cache, backing device and id).
fn listed(luns: &[LunSection], l: &LunSection) -> bool {
    luns.iter().any(|n| {
        n.name == l.name
            && n.cache == l.cache
            && n.backing == l.backing
            && n.backing_id == l.backing_id
    })
}

fn lun_map(cfg: &Loaded) -> HashMap<String, LunInfo> {
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
    pub fn open(cfg: Loaded, log: Logger) -> Result<Arc<Shared>, String> {
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

    fn t(&self) -> Arc<Tables> {
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
    pub fn lun_backend(&self, lun: &str) -> Result<LunBackend, String> {
        if let Some(r) = self.t().cfg.ram_luns.iter().find(|r| r.name == lun) {
            return Ok(LunBackend {
                backend: Arc::new(RamBackend::new(r.size)),
                capacity: r.size,
                block_size: 512,
            });
        }
        let (cache, id) = self
            .lun_cache(lun)
            .ok_or_else(|| format!("no lun {lun:?}"))?;
        let capacity = cache
            .backing_size(id)
            .ok_or("backing device not attached")?;
        let block_size = cache.geometry().block_size;
        Ok(LunBackend {
            backend: Arc::new(EngineBackend { cache, dev: id }),
            capacity,
            block_size,
        })
    }

    /// The largest capacity of a device of `lun` (bytes), None when it has none now.
    fn lun_capacity(&self, lun: &str) -> Option<u64> {
        if let Some(r) = self.t().cfg.ram_luns.iter().find(|r| r.name == lun) {
            return Some(r.size);
        }
        self.lun_cache(lun).and_then(|(c, id)| c.backing_size(id))
    }

    fn cache(&self, name: &str) -> Result<Arc<Cache>, String> {
        let t = self.t();
        t.caches.get(name).cloned().ok_or_else(|| {
            let known: Vec<&String> = t.caches.keys().collect();
            format!("no cache {name:?} (known: {known:?})")
        })
    }

    fn active_luns(&self) -> Vec<String> {
        self.served
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|s| s.lun.clone())
            .collect()
    }

    /// Re-reads the configuration file (SIGHUP, `lc reload`). New caches and LUNs come
    /// up, tunables and the log level change; a removed or changed LUN is refused while
    /// it is served or holds dirty data (drain it first), a cache whose device or RAM
    /// changes needs a restart. Refused as a whole, with the old configuration kept,
    /// when anything is refused or the file is bad. Returns what changed.
    pub fn reload(&self) -> Result<Vec<String>, String> {
        let _one = self.reloading.lock().unwrap_or_else(|e| e.into_inner());
        let old = self.t();
        let new = crate::config::load(&old.cfg.path).map_err(|e| e.to_string())?;
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
                return Err(format!(
                    "lun {}: removed or changed while served; delete its backstore first",
                    l.name
                ));
            }
            let n = dirty(&old.caches[&l.cache], l.backing_id);
            if n > 0 {
                return Err(format!(
                    "lun {}: removed or changed with {n} dirty lines; `lc drain {}` first",
                    l.name, l.name
                ));
            }
        }
        for r in &old.cfg.ram_luns {
            if !new.ram_luns.contains(r) && served.contains(&r.name) {
                return Err(format!(
                    "lun {}: removed or changed while served; delete its backstore first",
                    r.name
                ));
            }
        }
        for c in &old.cfg.caches {
            match new.caches.iter().find(|n| n.section.name == c.section.name) {
                Some(n)
                    if n.section.device != c.section.device
                        || n.section.o_direct != c.section.o_direct
                        || n.ram_bytes != c.ram_bytes =>
                {
                    return Err(format!(
                        "cache {}: device, o_direct or ram_buffer changed; that needs a restart",
                        c.section.name
                    ))
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
                        .map_err(|e| format!("lun {}: {e}", l.name))?;
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
                .map_err(|e| format!("lun {name}: {e}"))?;
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
                        .map_err(|e| format!("cache {}: {e}", c.section.name))?;
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

    /// Closes every cache (flush + superblock commit).
    pub fn close(&self) {
        for (name, c) in &self.t().caches {
            if let Err(e) = c.seal_now().and_then(|_| c.commit_superblock()) {
                error!(self.log, "closing cache failed"; "cache" => name, "error" => %e);
            }
        }
    }
}

/// Damage of a cache as the control protocol shows it: the damaged segments, lost lines
/// per backing device (with the LUN's name when configured), lost sector ranges.
fn damage_json(
    d: &lc_cache::DamageReport,
    luns: &[crate::config::LunSection],
    cache: &str,
) -> Value {
    let lun_of = |id: u8| {
        luns.iter()
            .find(|l| l.cache == cache && l.backing_id == id)
            .map(|l| l.name.clone())
    };
    json!({
        "segments": d.segments,
        "lost_lines": d.lost_lines.iter().map(|(id, n)| json!({"backing_id": id, "lun": lun_of(*id), "lines": n})).collect::<Vec<_>>(),
        "lost_ranges": d.lost_ranges.iter().map(|(id, s, n)| json!({"backing_id": id, "lun": lun_of(*id), "sector": s, "sectors": n})).collect::<Vec<_>>(),
        "unknown_after_segment": (d.unknown_upto > 0).then_some(d.unknown_upto),
    })
}

fn epoch_secs(t: std::time::SystemTime) -> u64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Per-LUN figures of one cache: the access counters of its backing device, dirty and
/// lost lines, whether writeback to it is failing.
fn lun_stats_json(s: &lc_cache::Stats, luns: &[crate::config::LunSection], cache: &str) -> Value {
    let per = |v: &[(u8, u64)], id: u8| v.iter().find(|(d, _)| *d == id).map_or(0, |x| x.1);
    luns.iter()
        .filter(|l| l.cache == cache)
        .map(|l| {
            let counters: serde_json::Map<String, Value> = s
                .device_counters
                .iter()
                .find(|(d, _)| *d == l.backing_id)
                .map(|(_, c)| {
                    (0..16)
                        .map(|i| (lc_cache::stats::counter_name(i), json!(c[i])))
                        .collect()
                })
                .unwrap_or_default();
            json!({
                "lun": l.name,
                "backing_id": l.backing_id,
                "counters": counters,
                "dirty_lines": per(&s.dirty_lines, l.backing_id),
                "lost_lines": s.damage.as_ref().map_or(0, |d| per(&d.lost_lines, l.backing_id)),
                "writeback_failing": s.writeback_failures.iter().any(|f| f.dev == l.backing_id),
            })
        })
        .collect()
}

fn stats_json(c: &Cache) -> Value {
    let s = c.stats();
    let counters: serde_json::Map<String, Value> = (0..16)
        .map(|i| (lc_cache::stats::counter_name(i), json!(s.counters[i])))
        .collect();
    json!({
        "counters": counters,
        "dirty_lines": s.dirty_lines.iter().map(|(d, n)| json!({"backing_id": d, "lines": n})).collect::<Vec<_>>(),
        "last_flushed_id": s.last_flushed_id,
        "last_writeback_id": s.last_writeback_id,
        "open_segment_id": s.open_segment_id,
        "nr_segments": s.nr_segments,
        "dirty_segments": s.dirty_segments,
        "cache_bytes_written": s.cache_bytes_written,
        "backing_bytes_written": s.backing_bytes_written,
        "ram_bytes": s.ram_bytes,
        "index_bytes": s.index_bytes,
        "partial_segments": s.partial_segments,
        "appends": s.appends,
        "staged_lines": s.staged_lines,
        "append_write_us": s.append_write_us,
        "append_flush_us": s.append_flush_us,
        "live_lines": s.live_lines,
        "stale_lines": s.stale_lines,
        "moved_lines": s.moved_lines,
        "written_back_lines": s.written_back_lines,
        "writeback_failures": s.writeback_failures.iter().map(|f| json!({"backing_id": f.dev, "since": epoch_secs(f.since), "error": f.error})).collect::<Vec<_>>(),
        "tunables": c.tunables().list().into_iter().collect::<HashMap<_, _>>(),
        "failure": c.failure(),
    })
}

impl Handler for Shared {
    fn handle(&self, req: Request, progress: &mut dyn FnMut(Value)) -> Result<Value, String> {
        let t = self.t();
        match req {
            Request::Status => {
                let served = self
                    .served
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .clone();
                let luns: Vec<Value> = t
                    .cfg
                    .luns
                    .iter()
                    .map(|l| {
                        let dev = served.iter().find(|s| s.lun == l.name);
                        let stats = t.caches.get(&l.cache).map(|c| c.stats());
                        let dirty = stats.as_ref().map_or(0, |s| {
                            s.dirty_lines.iter().find(|(d, _)| *d == l.backing_id).map_or(0, |x| x.1)
                        });
                        let damage = stats.as_ref().and_then(|s| s.damage.as_ref());
                        let lost = damage.map_or(0, |d| {
                            d.lost_lines.iter().find(|(d, _)| *d == l.backing_id).map_or(0, |x| x.1)
                        });
                        let failing = stats.as_ref().and_then(|s| {
                            s.writeback_failures.iter().find(|f| f.dev == l.backing_id).cloned()
                        });
                        json!({"name": l.name, "cache": l.cache, "backing": l.backing, "backing_id": l.backing_id,
                               "served_by": dev.map(|d| d.uio.clone()), "dirty_lines": dirty, "lost_lines": lost,
                               "unreadable_after_damage": damage.is_some_and(|d| d.unknown_upto > 0),
                               "writeback_failing_since": failing.as_ref().map(|f| epoch_secs(f.since)),
                               "writeback_error": failing.map(|f| f.error)})
                    })
                    .chain(t.cfg.ram_luns.iter().map(|r| {
                        let dev = served.iter().find(|s| s.lun == r.name);
                        json!({"name": r.name, "backend": "ram", "cache": "-",
                               "backing": format!("RAM, {}", crate::units::human(r.size)),
                               "size": r.size, "served_by": dev.map(|d| d.uio.clone()),
                               "dirty_lines": 0, "lost_lines": 0})
                    }))
                    .collect();
                let caches: Vec<Value> = t
                    .cfg
                    .caches
                    .iter()
                    .map(|c| {
                        let s = t.caches[&c.section.name].stats();
                        json!({"name": c.section.name, "device": c.section.device, "nr_segments": s.nr_segments,
                               "dirty_segments": s.dirty_segments, "last_writeback_id": s.last_writeback_id,
                               "failure": t.caches[&c.section.name].failure(),
                               "damage": s.damage.as_ref().map(|d| damage_json(d, &t.cfg.luns, &c.section.name))})
                    })
                    .collect();
                Ok(json!({"caches": caches, "luns": luns}))
            }
            Request::Stats { cache } => {
                let mut out = serde_json::Map::new();
                for (name, c) in &t.caches {
                    if cache.as_ref().is_none_or(|n| n == name) {
                        let mut v = stats_json(c);
                        let st = c.stats();
                        v["damage"] = st
                            .damage
                            .as_ref()
                            .map_or(Value::Null, |d| damage_json(d, &t.cfg.luns, name));
                        v["luns"] = lun_stats_json(&st, &t.cfg.luns, name);
                        out.insert(name.clone(), v);
                    }
                }
                if let Some(n) = cache {
                    self.cache(&n)?;
                }
                Ok(json!({ "stats": out }))
            }
            Request::Set { cache, key, value } => {
                self.cache(&cache)?
                    .set_tunable(&key, &value)
                    .map_err(|e| e.to_string())?;
                Ok(json!({}))
            }
            Request::Flush { cache } => {
                self.cache(&cache)?.seal_now().map_err(|e| e.to_string())?;
                Ok(json!({}))
            }
            Request::Commit { cache } => {
                self.cache(&cache)?
                    .commit_superblock()
                    .map_err(|e| e.to_string())?;
                Ok(json!({}))
            }
            Request::ClearStats { cache } => {
                self.cache(&cache)?.clear_stats();
                Ok(json!({}))
            }
            Request::Reload => {
                let changes = self.reload()?;
                Ok(json!({ "reloaded": changes }))
            }
            Request::AcceptLoss { cache } => {
                let report = self.cache(&cache)?.accept_loss();
                warn!(self.log, "operator accepted data loss"; "cache" => &cache,
                      "lost_lines" => format!("{:?}", report.lost_lines), "unknown_upto" => report.unknown_upto);
                Ok(json!({"accepted": damage_json(&report, &t.cfg.luns, &cache)}))
            }
            Request::Drain { lun } => {
                let l = t
                    .luns
                    .get(&lun)
                    .ok_or_else(|| format!("no lun {lun:?}"))?
                    .clone();
                let c = self.cache(&l.cache)?;
                let mut last = None;
                c.drain(l.id, &mut |p| {
                    if last != Some(p.remaining) {
                        last = Some(p.remaining);
                        progress(json!({"remaining": p.remaining, "total": p.total}));
                    }
                })
                .map_err(|e| e.to_string())?;
                info!(self.log, "lun drained"; "lun" => &lun);
                Ok(json!({"lun": lun, "dirty_lines": 0}))
            }
            Request::Check { cfgstring, size } => {
                t.cfg
                    .check_cfgstring(&cfgstring, size, &self.active_luns())?;
                Ok(json!({}))
            }
        }
    }
}

/// Builds the served device for a UIO device (after validating its cfgstring).
fn make_device(
    sh: &Shared,
    paths: &Paths,
    u: &UioDevice,
    busy_wait: Duration,
) -> Result<Device, String> {
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
        return Err(format!("hw_block_size {bs} is not a multiple of cache block size {cbs}; format the cache with --block-size 512 or create the backstore with hw_block_size={cbs}"));
    }
    let max_sectors = cfs
        .attrib_u64(u.hba, &u.name, "hw_max_sectors")
        .unwrap_or(128)
        .max(1) as u32;
    let serial = cfs
        .unit_serial(u.hba, &u.name)
        .unwrap_or_else(|| u.name.clone());
    let map_size = uio::map_size(&paths.sysfs, &u.uio).map_err(|e| e.to_string())?;
    let mut lc = LunConfig::new(&serial, bs, size / bs as u64);
    // hw_max_sectors is only LIO's advice (the optimal length); the kernel hands over
    // any command that fits the data area, which is the map less the ring (<= 8 MiB).
    lc.opt_transfer_blocks = max_sectors;
    lc.max_transfer_blocks = crate::scsi::max_transfer_for_data_area(
        (map_size as u64).saturating_sub(crate::scsi::MAX_RING_AREA),
        bs,
    );
    let (map, mut bell) =
        uio::open(&paths.dev, &u.uio, map_size, busy_wait).map_err(|e| e.to_string())?;
    bell.set_actions(cfs.dir(u.hba, &u.name).join("action"));
    let ring = Ring::new(map).map_err(|e| e.to_string())?;
    Ok(Device::new(
        &format!("{}/{}", u.hba, u.name),
        ring,
        Box::new(bell),
        Arc::new(LunState::new(lc)),
        be.backend,
        sh.log.new(slog::o!("lun" => lun)),
    ))
}

fn attach(
    sh: &Shared,
    paths: &Paths,
    el: &mut EventLoop,
    u: &UioDevice,
    busy_wait: Duration,
) -> Result<(), String> {
    let dev = make_device(sh, paths, u, busy_wait)?;
    let state = dev.lun();
    let token = el.add_device(dev).map_err(|e| e.to_string())?;
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
fn is_served(sh: &Shared, uio: &str, hba: u32, name: &str) -> bool {
    let device = format!("{hba}/{name}");
    sh.served
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .any(|d| d.uio == uio && d.device == device)
}

/// Stops serving `uio` (if it is served); true if it was.
fn drop_served(sh: &Shared, el: &mut EventLoop, uio: &str) -> bool {
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
                error!(log, "refusing device"; "uio" => &u.uio, "device" => &dev, "error" => &e);
                -libc::EINVAL
            }
        }
    };
    let done = sys::tcmu_genl_cmd_TCMU_CMD_ADDED_DEVICE_DONE as u8;
    let outcome = nl.reply_acked(done, id, status);
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
fn complete_waiting_enables(sh: &Shared, paths: &Paths, el: &mut EventLoop, nl: &mut TcmuNetlink) {
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
fn claim_existing(
    sh: &Shared,
    paths: &Paths,
    el: &mut EventLoop,
    nl: &mut TcmuNetlink,
) -> Result<(), String> {
    let log = &sh.log;
    let cfs = &paths.configfs;
    for u in uio::scan_tcmu(&paths.sysfs).map_err(|e| e.to_string())? {
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
                    error!(log, "cannot serve existing device"; "uio" => &u.uio, "error" => &e);
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

/// Hands every received netlink event to [`handle_event`] (bad messages are logged).
fn pump_netlink(sh: &Shared, paths: &Paths, el: &mut EventLoop, nl: &mut TcmuNetlink) {
    match nl.recv_events() {
        Ok(evs) => {
            for ev in evs {
                match ev {
                    Ok(ev) => handle_event(sh, paths, el, nl, ev),
                    Err(e) => warn!(sh.log, "bad netlink message"; "error" => e),
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
    let status = match ev.cmd as u32 {
        sys::tcmu_genl_cmd_TCMU_CMD_ADDED_DEVICE => match parsed {
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
                        error!(sh.log, "refusing device"; "device" => &ev.device, "error" => &e);
                        -libc::EINVAL
                    }
                }
            }
            // Not ours: like tcmu-runner, refuse so the creation fails visibly.
            _ => -libc::ENOENT,
        },
        sys::tcmu_genl_cmd_TCMU_CMD_REMOVED_DEVICE => {
            drop_served(sh, el, &format!("uio{}", ev.minor));
            0
        }
        sys::tcmu_genl_cmd_TCMU_CMD_RECONFIG_DEVICE => {
            let uio = format!("uio{}", ev.minor);
            let served = sh
                .served
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .find(|d| d.uio == uio)
                .cloned();
            let r = match served {
                None => Err("device not served by this daemon".to_string()),
                Some(d) => match sh.lun_capacity(&d.lun) {
                    None => Err("backing device not attached".to_string()),
                    Some(b) => reconfigure(&d.state, &d.lun, b, ev.change.as_ref()),
                },
            };
            match r {
                Ok(what) => {
                    info!(sh.log, "device reconfigured"; "device" => &ev.device, "change" => what);
                    0
                }
                Err(e) => {
                    error!(sh.log, "reconfiguration refused"; "device" => &ev.device, "error" => e);
                    match ev.change {
                        Some(Reconfig::Size(_)) => -libc::EINVAL,
                        _ => -libc::EOPNOTSUPP,
                    }
                }
            }
        }
        _ => return,
    };
    if let Err(e) = nl.reply(&ev, status) {
        error!(sh.log, "netlink reply failed"; "error" => %e);
    }
}

/// Runs the daemon until SIGTERM/SIGINT.
pub fn serve(cfg: Loaded, paths: Paths, log: Logger) -> Result<(), String> {
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(sig, stop.clone()).map_err(|e| e.to_string())?;
    }
    let hup = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGHUP, hup.clone())
        .map_err(|e| e.to_string())?;
    // Every signal also writes a byte into this pipe, which the event loop watches: a
    // signal is handled at once, not at the loop's next timer.
    let (sig_rx, sig_tx) = std::os::unix::net::UnixStream::pair().map_err(|e| e.to_string())?;
    sig_rx.set_nonblocking(true).map_err(|e| e.to_string())?;
    for sig in [
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGHUP,
    ] {
        let tx = sig_tx.try_clone().map_err(|e| e.to_string())?;
        signal_hook::low_level::pipe::register(sig, tx).map_err(|e| e.to_string())?;
    }
    let io_threads = cfg.daemon.io_threads;
    let socket = cfg.daemon.control_socket.clone();
    let sh = Shared::open(cfg, log.clone())?;
    let mut el = EventLoop::new(io_threads, log.clone()).map_err(|e| e.to_string())?;
    el.set_busy_poll(Duration::from_micros(sh.t().cfg.daemon.busy_poll_us));
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
    let mut nl = TcmuNetlink::connect().map_err(|e| format!("netlink: {e}"))?;
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
            Err(e @ crate::dbus::DbusError::NameTaken) => return Err(e.to_string()),
            Err(e) => {
                warn!(log, "no D-Bus service (targetcli will not list user:lc)"; "error" => %e);
                None
            }
        }
    } else {
        None
    };
    let nl_token = el.add_source(nl.fd()).map_err(|e| e.to_string())?;
    // Events read while waiting for acknowledgements during start-up are not in the
    // socket any more: no readiness will announce them.
    if nl.has_stashed() {
        pump_netlink(&sh, &paths, &mut el, &mut nl);
    }
    let sig_token = el
        .add_source(std::os::fd::AsRawFd::as_raw_fd(&sig_rx))
        .map_err(|e| e.to_string())?;
    let listener = control::listen(&socket)?;
    let ctl_token = el
        .add_source(std::os::fd::AsRawFd::as_raw_fd(&listener))
        .map_err(|e| e.to_string())?;
    let handler: Arc<dyn Handler> = sh.clone();
    let metrics = match sh.t().cfg.daemon.metrics_listen {
        Some(addr) => {
            let l = std::net::TcpListener::bind(addr)
                .map_err(|e| format!("metrics_listen {addr}: {e}"))?;
            l.set_nonblocking(true).map_err(|e| e.to_string())?;
            let token = el
                .add_source(std::os::fd::AsRawFd::as_raw_fd(&l))
                .map_err(|e| e.to_string())?;
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
            let _ = sd_notify::notify(&[sd_notify::NotifyState::Reloading]);
            if let Err(e) = sh.reload() {
                error!(log, "reload refused; the configuration in force is kept"; "error" => e);
            }
            let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
        }
        let ready = el.run_once(None).map_err(|e| e.to_string())?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reconfig_resizes_within_the_backing_device_and_toggles_the_write_cache() {
        let st = LunState::new(LunConfig::new("s", 512, 100));
        let backing = 1 << 20;
        let r = |c: Reconfig| reconfigure(&st, "disk0", backing, Some(&c));
        assert!(r(Reconfig::Size(1 << 20)).is_ok());
        assert_eq!(st.num_blocks(), 2048);
        let e = r(Reconfig::Size((1 << 20) + 512)).unwrap_err();
        assert!(e.contains("exceeds the backing device"), "{e}");
        let e = r(Reconfig::Size(1000)).unwrap_err();
        assert!(e.contains("multiple of the block size 512"), "{e}");
        assert!(r(Reconfig::Size(0)).is_err());
        assert_eq!(st.num_blocks(), 2048, "refused sizes change nothing");
        assert!(r(Reconfig::WriteCache(false)).is_ok());
        assert!(!st.write_cache());
        assert!(r(Reconfig::WriteCache(true)).is_ok());
        assert!(st.write_cache());
        assert!(r(Reconfig::Config("lc/disk0\n".into())).is_ok());
        let e = r(Reconfig::Config("lc/disk1".into())).unwrap_err();
        assert!(e.contains("delete the backstore"), "{e}");
        assert!(r(Reconfig::Unknown).is_err());
        assert!(reconfigure(&st, "disk0", backing, None).is_err());
    }
}
