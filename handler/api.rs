//! The control protocol's messages (`docs/CONTROL.md`): the requests, the answer to
//! each, and drain's progress lines, as serde types shared by the daemon (which
//! builds them) and the CLI (which reads them). The transport is `control.rs`.
//!
//! On the wire every answer is a JSON object whose keys are sorted (they pass through
//! `serde_json::Value`); the transport adds `"ok": true`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// A request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Caches, LUNs and served devices.
    Status,
    /// Statistics of one cache (or all).
    Stats {
        /// Cache name; all when absent.
        #[serde(default)]
        cache: Option<String>,
    },
    /// Set a tunable.
    Set {
        /// Cache name.
        cache: String,
        /// Tunable.
        key: String,
        /// Value.
        value: String,
    },
    /// Seal and flush the open segment, wait until durable.
    Flush {
        /// Cache name.
        cache: String,
    },
    /// Commit the superblock now.
    Commit {
        /// Cache name.
        cache: String,
    },
    /// Reset the access counters.
    ClearStats {
        /// Cache name.
        cache: String,
    },
    /// Re-read the configuration file (as SIGHUP does); the answer lists what changed.
    Reload,
    /// The operator accepts data lost to cache log damage: reply with what was lost,
    /// then stop refusing reads of it (older data becomes readable).
    AcceptLoss {
        /// Cache name.
        cache: String,
    },
    /// Read every line a cache holds on its cache device and check it against its
    /// line checksum (progress lines, then a final line).
    Scrub {
        /// Cache name.
        cache: String,
    },
    /// Write back every dirty line of a LUN's backing device (progress lines, then a
    /// final line).
    Drain {
        /// LUN name.
        lun: String,
    },
    /// Validate a cfgstring as targetcli would send it.
    Check {
        /// e.g. "lc/disk0".
        cfgstring: String,
        /// Size targetcli would create.
        #[serde(default)]
        size: Option<u64>,
    },
}

/// The answer to a request (without `"ok"`).
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Response {
    /// To `status`.
    Status(Status),
    /// To `stats`.
    Stats(StatsReply),
    /// To `reload`.
    Reloaded(Reloaded),
    /// To `accept_loss`.
    Accepted(Accepted),
    /// To `drain`.
    Drained(Drained),
    /// To `scrub`.
    Scrubbed(Scrubbed),
    /// To `set`, `flush`, `commit`, `clear_stats` and `check`: no fields.
    Done(Done),
}

/// A progress line of `drain`: `{"progress": {"remaining": N, "total": M}}`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Progress {
    /// Dirty lines left.
    pub remaining: u64,
    /// Dirty lines when the drain started (grows if more arrive).
    pub total: u64,
}

/// An answer without fields: `{}`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Done {}

/// `status`: every configured cache and LUN.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Status {
    /// The caches, in configuration order.
    pub caches: Vec<CacheStatus>,
    /// The LUNs: those with a cache first, then the RAM LUNs.
    pub luns: Vec<LunStatus>,
}

/// One cache in `status`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CacheStatus {
    /// Its name.
    pub name: String,
    /// Its device.
    pub device: String,
    /// Log segment slots.
    pub nr_segments: u64,
    /// Segments holding dirty data.
    pub dirty_segments: u64,
    /// Id of the last segment written back.
    pub last_writeback_id: u64,
    /// Why the cache failed, if it did.
    pub failure: Option<String>,
    /// Damage of its log; None for an intact log.
    pub damage: Option<Damage>,
}

/// One LUN in `status`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum LunStatus {
    /// A LUN served from a cache and a backing device.
    Cached(CachedLunStatus),
    /// A RAM LUN (`backend = "ram"`).
    Ram(RamLunStatus),
}

/// A LUN with a cache in `status`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CachedLunStatus {
    /// Its name.
    pub name: String,
    /// Its cache.
    pub cache: String,
    /// Its backing device.
    pub backing: String,
    /// Its backing id in the cache.
    pub backing_id: u8,
    /// The uio device serving it (`uioN`), if any.
    pub served_by: Option<String>,
    /// Dirty lines of its backing device.
    pub dirty_lines: u64,
    /// Lines lost to cache log damage.
    pub lost_lines: u64,
    /// Whether lines not rewritten since a damaged segment are refused.
    pub unreadable_after_damage: bool,
    /// Since when writeback to it fails (seconds since the epoch).
    pub writeback_failing_since: Option<u64>,
    /// The error writeback meets.
    pub writeback_error: Option<String>,
}

/// A RAM LUN in `status`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RamLunStatus {
    /// Its name.
    pub name: String,
    /// Always "ram".
    pub backend: String,
    /// Always "-".
    pub cache: String,
    /// "RAM, <size>".
    pub backing: String,
    /// Its size in bytes.
    pub size: u64,
    /// The uio device serving it (`uioN`), if any.
    pub served_by: Option<String>,
    /// Always 0.
    pub dirty_lines: u64,
    /// Always 0.
    pub lost_lines: u64,
}

/// Damage of a cache's log: `null` in JSON for an intact log.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Damage {
    /// The damaged segments (kept until written back).
    pub segments: Vec<u64>,
    /// Lines lost per backing device.
    pub lost_lines: Vec<LostLines>,
    /// Sector ranges lost.
    pub lost_ranges: Vec<LostRange>,
    /// When a damaged segment's header was unreadable, its id.
    pub unknown_after_segment: Option<u64>,
    /// The loss is recorded in the cache's checkpoints (format 2): the damaged segments
    /// no longer hold the log back.
    #[serde(default)]
    pub recorded: bool,
}

/// Lines lost on one backing device.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LostLines {
    /// The backing device.
    pub backing_id: u8,
    /// Its LUN when configured.
    pub lun: Option<String>,
    /// Lines lost.
    pub lines: u64,
}

/// A sector range lost on one backing device.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LostRange {
    /// The backing device.
    pub backing_id: u8,
    /// Its LUN when configured.
    pub lun: Option<String>,
    /// First sector (512 bytes).
    pub sector: u64,
    /// Sectors.
    pub sectors: u64,
}

/// `stats`: per cache name.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct StatsReply {
    /// The figures of each cache asked for.
    pub stats: BTreeMap<String, CacheStats>,
}

/// The figures of one cache (`lc_cache::Stats` and more).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct CacheStats {
    /// dm-lc's 16 access counters by name.
    pub counters: BTreeMap<String, u64>,
    /// Dirty lines per backing device.
    pub dirty_lines: Vec<DirtyLines>,
    /// See `lc_cache::Stats`.
    pub last_flushed_id: u64,
    /// See `lc_cache::Stats`.
    pub last_writeback_id: u64,
    /// See `lc_cache::Stats`.
    pub open_segment_id: u64,
    /// See `lc_cache::Stats`.
    pub nr_segments: u64,
    /// See `lc_cache::Stats`.
    pub dirty_segments: u64,
    /// See `lc_cache::Stats`.
    pub cache_bytes_written: u64,
    /// See `lc_cache::Stats`.
    pub backing_bytes_written: u64,
    /// See `lc_cache::Stats`.
    pub ram_bytes: u64,
    /// See `lc_cache::Stats`.
    pub index_bytes: u64,
    /// See `lc_cache::Stats`.
    pub partial_segments: u64,
    /// See `lc_cache::Stats`.
    pub appends: u64,
    /// See `lc_cache::Stats`.
    #[serde(default)]
    pub caller_appends: u64,
    /// See `lc_cache::Stats`.
    pub staged_lines: u64,
    /// See `lc_cache::Stats`.
    pub append_write_us: u64,
    /// See `lc_cache::Stats`.
    pub append_flush_us: u64,
    /// See `lc_cache::Stats`.
    #[serde(default)]
    pub append_locked_us: u64,
    /// See `lc_cache::Stats`.
    pub live_lines: u64,
    /// See `lc_cache::Stats`.
    pub stale_lines: u64,
    /// See `lc_cache::Stats`.
    pub moved_lines: u64,
    /// See `lc_cache::Stats`.
    #[serde(default)]
    pub rotten_found: u64,
    /// See `lc_cache::Stats`.
    #[serde(default)]
    pub cleaner_bytes_read: u64,
    /// See `lc_cache::Stats`.
    pub written_back_lines: u64,
    /// See `lc_cache::Stats`: lines promoted into the cache on read misses.
    pub promoted_lines: u64,
    /// See `lc_cache::Stats`: bytes written around the cache (write-around).
    pub bypassed_bytes: u64,
    /// Backing devices writeback fails on.
    pub writeback_failures: Vec<WritebackFailure>,
    /// The tunables in force.
    pub tunables: BTreeMap<String, String>,
    /// Why the cache failed, if it did.
    pub failure: Option<String>,
    /// Damage of its log; None for an intact log.
    pub damage: Option<Damage>,
    /// Per-LUN figures.
    pub luns: Vec<LunStats>,
}

/// Dirty lines of one backing device.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirtyLines {
    /// The backing device.
    pub backing_id: u8,
    /// Dirty lines.
    pub lines: u64,
}

/// Writeback failing on one backing device.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WritebackFailure {
    /// The backing device.
    pub backing_id: u8,
    /// Since when (seconds since the epoch).
    pub since: u64,
    /// The error.
    pub error: String,
}

/// Figures of one LUN of a cache.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LunStats {
    /// The LUN's name.
    pub lun: String,
    /// Its backing id.
    pub backing_id: u8,
    /// The access counters of its backing device by name.
    pub counters: BTreeMap<String, u64>,
    /// Its dirty lines.
    pub dirty_lines: u64,
    /// Its lines lost to damage.
    pub lost_lines: u64,
    /// Whether writeback to it fails.
    pub writeback_failing: bool,
    /// Its lines promoted into the cache on read misses.
    pub promoted_lines: u64,
    /// Bytes of it that went around the cache (write-around).
    pub bypassed_bytes: u64,
    /// Writes of it that went around the cache.
    pub bypassed_writes: u64,
}

/// `reload`: what changed.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reloaded {
    /// One line per change (`"lun disk1 added"`, ...).
    pub reloaded: Vec<String>,
}

/// `accept_loss`: what was lost.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Accepted {
    /// The damage accepted.
    pub accepted: Damage,
}

/// `drain`: the LUN is clean.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Drained {
    /// The LUN.
    pub lun: String,
    /// Always 0.
    pub dirty_lines: u64,
}

/// `scrub`: what was checked and found.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Scrubbed {
    /// The cache.
    pub cache: String,
    /// Log segments checked.
    pub segments: u64,
    /// Line copies read and checked.
    pub lines: u64,
    /// Bytes read from the cache device.
    pub bytes_read: u64,
    /// Copies that failed their check (dirty ones are lost, clean ones dropped).
    pub rotten: u64,
    /// The cache's damage afterwards (what is lost, found by this scrub or before).
    pub damage: Option<Damage>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    /// The field names of `v`, recursively; the keys of `maps` (name-keyed maps, not
    /// fields) are skipped, their values' fields are not.
    fn fields(v: &Value, maps: &[&str], out: &mut Vec<String>) {
        match v {
            Value::Object(m) => {
                for (k, x) in m {
                    out.push(k.clone());
                    if maps.contains(&k.as_str()) {
                        for y in x.as_object().into_iter().flat_map(|o| o.values()) {
                            fields(y, maps, out);
                        }
                    } else {
                        fields(x, maps, out);
                    }
                }
            }
            Value::Array(a) => a.iter().for_each(|x| fields(x, maps, out)),
            _ => {}
        }
    }

    fn damage() -> Damage {
        Damage {
            segments: vec![3],
            lost_lines: vec![LostLines {
                backing_id: 0,
                lun: Some("disk0".into()),
                lines: 1,
            }],
            lost_ranges: vec![LostRange {
                backing_id: 0,
                lun: Some("disk0".into()),
                sector: 8,
                sectors: 8,
            }],
            unknown_after_segment: Some(3),
            recorded: true,
        }
    }

    /// The row of the requests table for `cmd`, and the `damage` paragraph.
    fn doc(cmd: &str) -> String {
        let doc = include_str!("../docs/CONTROL.md");
        let row = doc
            .lines()
            .find(|l| l.starts_with(&format!("| `{{\"cmd\":\"{cmd}\"")))
            .unwrap_or_else(|| panic!("docs/CONTROL.md has no row for {cmd}"));
        let damage = &doc[doc.find("`damage` is `null`").expect("damage paragraph")..];
        format!("{row}\n{damage}")
    }

    fn assert_documented(cmd: &str, answer: &impl Serialize, maps: &[&str]) {
        let text = doc(cmd);
        let mut names = Vec::new();
        fields(&serde_json::to_value(answer).unwrap(), maps, &mut names);
        for n in names {
            assert!(
                text.contains(&n),
                "docs/CONTROL.md does not document field {n:?} of the {cmd} answer"
            );
        }
    }

    #[test]
    fn control_md_documents_every_field_of_every_answer() {
        let status = Status {
            caches: vec![CacheStatus {
                name: "c0".into(),
                device: "/dev/sdb".into(),
                nr_segments: 1,
                dirty_segments: 1,
                last_writeback_id: 1,
                failure: Some("x".into()),
                damage: Some(damage()),
            }],
            luns: vec![LunStatus::Cached(CachedLunStatus {
                name: "disk0".into(),
                cache: "c0".into(),
                backing: "/dev/sdc".into(),
                backing_id: 0,
                served_by: Some("uio0".into()),
                dirty_lines: 1,
                lost_lines: 1,
                unreadable_after_damage: true,
                writeback_failing_since: Some(1),
                writeback_error: Some("x".into()),
            })],
        };
        let mut status = status;
        status.luns.push(LunStatus::Ram(RamLunStatus {
            name: "ram0".into(),
            backend: "ram".into(),
            cache: "-".into(),
            backing: "RAM, 1.0 GiB".into(),
            size: 1 << 30,
            served_by: Some("uio1".into()),
            dirty_lines: 0,
            lost_lines: 0,
        }));
        assert_documented("status", &status, &[]);
        let mut stats = CacheStats {
            dirty_lines: vec![DirtyLines {
                backing_id: 0,
                lines: 1,
            }],
            writeback_failures: vec![WritebackFailure {
                backing_id: 0,
                since: 1,
                error: "x".into(),
            }],
            failure: Some("x".into()),
            damage: Some(damage()),
            luns: vec![LunStats {
                lun: "disk0".into(),
                backing_id: 0,
                counters: BTreeMap::new(),
                dirty_lines: 1,
                lost_lines: 1,
                writeback_failing: true,
                promoted_lines: 1,
                bypassed_bytes: 1,
                bypassed_writes: 1,
            }],
            ..CacheStats::default()
        };
        stats.counters.insert("read_hit_ram_full".into(), 1);
        let stats = StatsReply {
            stats: [("c0".to_string(), stats)].into(),
        };
        assert_documented("stats", &stats, &["stats", "counters", "tunables"]);
        assert_documented(
            "reload",
            &Reloaded {
                reloaded: vec!["x".into()],
            },
            &[],
        );
        assert_documented("accept_loss", &Accepted { accepted: damage() }, &[]);
        let drained = Drained {
            lun: "disk0".into(),
            dirty_lines: 0,
        };
        assert_documented("drain", &drained, &[]);
        assert_documented("drain", &Progress::default(), &[]);
        let scrubbed = Scrubbed {
            cache: "c0".into(),
            segments: 1,
            lines: 1,
            bytes_read: 1,
            rotten: 1,
            damage: Some(damage()),
        };
        assert_documented("scrub", &scrubbed, &[]);
        assert_documented("scrub", &Progress::default(), &[]);
        for cmd in ["set", "flush", "commit", "clear_stats", "check"] {
            assert_documented(cmd, &Done {}, &[]);
        }
    }

    #[test]
    fn answers_read_back_as_the_daemon_wrote_them() {
        let ram = LunStatus::Ram(RamLunStatus {
            name: "ram0".into(),
            backend: "ram".into(),
            cache: "-".into(),
            backing: "RAM, 1.0 GiB".into(),
            size: 1 << 30,
            served_by: None,
            dirty_lines: 0,
            lost_lines: 0,
        });
        let cached = LunStatus::Cached(CachedLunStatus {
            name: "disk0".into(),
            cache: "c0".into(),
            backing: "/dev/sdc".into(),
            backing_id: 0,
            served_by: None,
            dirty_lines: 0,
            lost_lines: 0,
            unreadable_after_damage: false,
            writeback_failing_since: None,
            writeback_error: None,
        });
        let v = serde_json::to_value(vec![&cached, &ram]).unwrap();
        // A RAM LUN has no backing_id or writeback fields; a cached LUN shows its
        // absent values as null.
        assert_eq!(
            v.to_string(),
            r#"[{"backing":"/dev/sdc","backing_id":0,"cache":"c0","dirty_lines":0,"lost_lines":0,"name":"disk0","served_by":null,"unreadable_after_damage":false,"writeback_error":null,"writeback_failing_since":null},{"backend":"ram","backing":"RAM, 1.0 GiB","cache":"-","dirty_lines":0,"lost_lines":0,"name":"ram0","served_by":null,"size":1073741824}]"#
        );
        let back: Vec<LunStatus> = serde_json::from_value(v).unwrap();
        assert_eq!(back, vec![cached, ram]);
    }
}
