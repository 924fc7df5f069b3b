//! What each control request does (`docs/CONTROL.md`): the daemon's [`Handler`],
//! answering with the typed messages of `api.rs`.

use std::sync::Arc;

use slog::{info, warn};

use lc_cache::Cache;

use super::Shared;
use crate::api::{
    Accepted, CacheStats, CacheStatus, CachedLunStatus, Damage, DirtyLines, Done, Drained,
    LostLines, LostRange, LunStats, LunStatus, Progress, RamLunStatus, Reloaded, Request, Response,
    Scrubbed, StatsReply, Status, WritebackFailure,
};
use crate::config::LunSection;
use crate::control::Handler;
use crate::error::{Error, Result};

/// Damage of a cache as the control protocol shows it: the damaged segments, lost lines
/// per backing device (with the LUN's name when configured), lost sector ranges.
fn damage(d: &lc_cache::DamageReport, luns: &[LunSection], cache: &str) -> Damage {
    let lun_of = |id: u8| {
        luns.iter()
            .find(|l| l.cache == cache && l.backing_id == id)
            .map(|l| l.name.clone())
    };
    Damage {
        segments: d.segments.clone(),
        lost_lines: d
            .lost_lines
            .iter()
            .map(|&(backing_id, lines)| LostLines {
                backing_id,
                lun: lun_of(backing_id),
                lines,
            })
            .collect(),
        lost_ranges: d
            .lost_ranges
            .iter()
            .map(|&(backing_id, sector, sectors)| LostRange {
                backing_id,
                lun: lun_of(backing_id),
                sector,
                sectors,
            })
            .collect(),
        unknown_after_segment: (d.unknown_upto > 0).then_some(d.unknown_upto),
        recorded: d.recorded,
    }
}

fn epoch_secs(t: std::time::SystemTime) -> u64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The 16 access counters by name.
fn counters(c: &lc_cache::stats::Counters) -> std::collections::BTreeMap<String, u64> {
    (0..16)
        .map(|i| (lc_cache::stats::counter_name(i), c[i]))
        .collect()
}

/// Per-LUN figures of one cache: the access counters of its backing device, dirty and
/// lost lines, whether writeback to it is failing.
fn lun_stats(s: &lc_cache::Stats, luns: &[LunSection], cache: &str) -> Vec<LunStats> {
    let per = |v: &[(u8, u64)], id: u8| v.iter().find(|(d, _)| *d == id).map_or(0, |x| x.1);
    luns.iter()
        .filter(|l| l.cache == cache)
        .map(|l| LunStats {
            lun: l.name.clone(),
            backing_id: l.backing_id,
            counters: s
                .device_counters
                .iter()
                .find(|(d, _)| *d == l.backing_id)
                .map(|(_, c)| counters(c))
                .unwrap_or_default(),
            dirty_lines: per(&s.dirty_lines, l.backing_id),
            lost_lines: s
                .damage
                .as_ref()
                .map_or(0, |d| per(&d.lost_lines, l.backing_id)),
            writeback_failing: s.writeback_failures.iter().any(|f| f.dev == l.backing_id),
            promoted_lines: per(&s.device_promoted_lines, l.backing_id),
            bypassed_bytes: per(&s.device_bypassed_bytes, l.backing_id),
            bypassed_writes: per(&s.device_bypassed_writes, l.backing_id),
        })
        .collect()
}

/// The figures of one cache.
fn cache_stats(c: &Cache, luns: &[LunSection], cache: &str) -> CacheStats {
    let s = c.stats();
    CacheStats {
        counters: counters(&s.counters),
        dirty_lines: s
            .dirty_lines
            .iter()
            .map(|&(backing_id, lines)| DirtyLines { backing_id, lines })
            .collect(),
        last_flushed_id: s.last_flushed_id,
        last_writeback_id: s.last_writeback_id,
        open_segment_id: s.open_segment_id,
        nr_segments: s.nr_segments,
        dirty_segments: s.dirty_segments,
        cache_bytes_written: s.cache_bytes_written,
        backing_bytes_written: s.backing_bytes_written,
        ram_bytes: s.ram_bytes,
        index_bytes: s.index_bytes,
        partial_segments: s.partial_segments,
        appends: s.appends,
        staged_lines: s.staged_lines,
        caller_appends: s.caller_appends,
        append_write_us: s.append_write_us,
        append_flush_us: s.append_flush_us,
        append_locked_us: s.append_locked_us,
        live_lines: s.live_lines,
        stale_lines: s.stale_lines,
        moved_lines: s.moved_lines,
        rotten_found: s.rotten_found,
        cleaner_bytes_read: s.cleaner_bytes_read,
        written_back_lines: s.written_back_lines,
        promoted_lines: s.promoted_lines,
        bypassed_bytes: s.bypassed_bytes,
        writeback_failures: s
            .writeback_failures
            .iter()
            .map(|f| WritebackFailure {
                backing_id: f.dev,
                since: epoch_secs(f.since),
                error: f.error.clone(),
            })
            .collect(),
        tunables: c
            .tunables()
            .list()
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect(),
        failure: c.failure(),
        damage: s.damage.as_ref().map(|d| damage(d, luns, cache)),
        luns: lun_stats(&s, luns, cache),
    }
}

impl Shared {
    /// The answer to `status`.
    fn status(&self) -> Status {
        let t = self.t();
        let served = self
            .served
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let served_by = |lun: &str| served.iter().find(|s| s.lun == lun).map(|d| d.uio.clone());
        let luns = t
            .cfg
            .luns
            .iter()
            .map(|l| {
                let stats = t.caches.get(&l.cache).map(|c| c.stats());
                let per = |v: &[(u8, u64)]| {
                    v.iter()
                        .find(|(d, _)| *d == l.backing_id)
                        .map_or(0, |x| x.1)
                };
                let damage = stats.as_ref().and_then(|s| s.damage.as_ref());
                let failing = stats.as_ref().and_then(|s| {
                    s.writeback_failures
                        .iter()
                        .find(|f| f.dev == l.backing_id)
                        .cloned()
                });
                LunStatus::Cached(CachedLunStatus {
                    name: l.name.clone(),
                    cache: l.cache.clone(),
                    backing: l.backing.to_string_lossy().into_owned(),
                    backing_id: l.backing_id,
                    served_by: served_by(&l.name),
                    dirty_lines: stats.as_ref().map_or(0, |s| per(&s.dirty_lines)),
                    lost_lines: damage.map_or(0, |d| per(&d.lost_lines)),
                    unreadable_after_damage: damage.is_some_and(|d| d.unknown_upto > 0),
                    writeback_failing_since: failing.as_ref().map(|f| epoch_secs(f.since)),
                    writeback_error: failing.map(|f| f.error),
                })
            })
            .chain(t.cfg.ram_luns.iter().map(|r| {
                LunStatus::Ram(RamLunStatus {
                    name: r.name.clone(),
                    backend: "ram".into(),
                    cache: "-".into(),
                    backing: format!("RAM, {}", crate::units::human(r.size)),
                    size: r.size,
                    served_by: served_by(&r.name),
                    dirty_lines: 0,
                    lost_lines: 0,
                })
            }))
            .collect();
        let caches = t
            .cfg
            .caches
            .iter()
            .map(|c| {
                let name = &c.section.name;
                let s = t.caches[name].stats();
                CacheStatus {
                    name: name.clone(),
                    device: c.section.device.to_string_lossy().into_owned(),
                    nr_segments: s.nr_segments,
                    dirty_segments: s.dirty_segments,
                    last_writeback_id: s.last_writeback_id,
                    failure: t.caches[name].failure(),
                    damage: s.damage.as_ref().map(|d| damage(d, &t.cfg.luns, name)),
                }
            })
            .collect();
        Status { caches, luns }
    }

    /// A control request on a cache that the engine can refuse.
    fn on_cache(
        &self,
        cache: &str,
        f: impl FnOnce(&Arc<Cache>) -> lc_cache::Result<()>,
    ) -> Result<Response> {
        f(&self.cache(cache)?).map_err(|source| Error::CacheRequest {
            cache: cache.to_string(),
            source,
        })?;
        Ok(Response::Done(Done {}))
    }
}

impl Handler for Shared {
    fn handle(&self, req: Request, progress: &mut dyn FnMut(Progress)) -> Result<Response> {
        let t = self.t();
        match req {
            Request::Status => Ok(Response::Status(self.status())),
            Request::Stats { cache } => {
                let stats = t
                    .caches
                    .iter()
                    .filter(|(name, _)| cache.as_ref().is_none_or(|n| n == *name))
                    .map(|(name, c)| (name.clone(), cache_stats(c, &t.cfg.luns, name)))
                    .collect();
                if let Some(n) = cache {
                    self.cache(&n)?;
                }
                Ok(Response::Stats(StatsReply { stats }))
            }
            Request::Set { cache, key, value } => {
                self.on_cache(&cache, |c| c.set_tunable(&key, &value))
            }
            Request::Flush { cache } => self.on_cache(&cache, |c| c.seal_now()),
            Request::Commit { cache } => self.on_cache(&cache, |c| c.commit_superblock()),
            Request::ClearStats { cache } => {
                self.cache(&cache)?.clear_stats();
                Ok(Response::Done(Done {}))
            }
            Request::Reload => Ok(Response::Reloaded(Reloaded {
                reloaded: self.reload()?,
            })),
            Request::AcceptLoss { cache } => {
                let report = self.cache(&cache)?.accept_loss();
                warn!(self.log, "operator accepted data loss"; "cache" => &cache,
                      "lost_lines" => format!("{:?}", report.lost_lines), "unknown_upto" => report.unknown_upto);
                Ok(Response::Accepted(Accepted {
                    accepted: damage(&report, &t.cfg.luns, &cache),
                }))
            }
            Request::Scrub { cache } => {
                let c = self.cache(&cache)?;
                let r = c
                    .scrub(&mut |p| {
                        progress(Progress {
                            remaining: p.total - p.done,
                            total: p.total,
                        })
                    })
                    .map_err(|source| Error::CacheRequest {
                        cache: cache.clone(),
                        source,
                    })?;
                let found = c.stats().damage;
                if r.rotten > 0 {
                    warn!(self.log, "scrub found rotten line copies"; "cache" => &cache, "rotten" => r.rotten);
                } else {
                    info!(self.log, "scrub found nothing"; "cache" => &cache, "lines" => r.lines);
                }
                Ok(Response::Scrubbed(Scrubbed {
                    damage: found.as_ref().map(|d| damage(d, &t.cfg.luns, &cache)),
                    cache,
                    segments: r.segments,
                    lines: r.lines,
                    bytes_read: r.bytes_read,
                    rotten: r.rotten,
                }))
            }
            Request::Drain { lun } => {
                let l = t
                    .luns
                    .get(&lun)
                    .ok_or_else(|| Error::NoLun { lun: lun.clone() })?;
                let mut last = None;
                self.on_cache(&l.cache, |c| {
                    c.drain(l.id, &mut |p| {
                        if last != Some(p.remaining) {
                            last = Some(p.remaining);
                            progress(Progress {
                                remaining: p.remaining,
                                total: p.total,
                            });
                        }
                    })
                })?;
                info!(self.log, "lun drained"; "lun" => &lun);
                Ok(Response::Drained(Drained {
                    lun,
                    dirty_lines: 0,
                }))
            }
            Request::Check { cfgstring, size } => {
                t.cfg
                    .check_cfgstring(&cfgstring, size, &self.active_luns())?;
                Ok(Response::Done(Done {}))
            }
        }
    }
}
