//! Runtime-settable tunables, their defaults and validation.

use crate::error::{Error, Result};

/// Tunables of one cache. Defaults are those of [`Tunables::default`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tunables {
    /// Write dirty data back in the background when above the threshold (default true).
    pub writeback_enabled: bool,
    /// Write back regardless of the threshold (default false).
    pub writeback_force: bool,
    /// Dirty share of the ring, in percent, above which writeback runs (default 70).
    pub writeback_threshold: u32,
    /// Segments written back per batch, 1..=64 (default 8).
    pub writeback_batch: u32,
    /// Sort and merge the dirty lines of a batch before writing them back (default true).
    pub writeback_sort: bool,
    /// Longest time a flush or FUA write waits for a partial segment to be sealed,
    /// 0..=1000 ms (default 3).
    pub barrier_deadline_ms: u32,
    /// Superblock commit period in seconds, 1..=3600 (default 10).
    pub superblock_commit_interval_s: u32,
    /// Seal the open segment after this many idle seconds, 0 = never (default 5).
    pub flush_interval_s: u32,
    /// Once writeback to a backing device has failed for this many seconds, writes to
    /// that device, and writes that wait for log space it holds, fail instead of
    /// waiting, 1..=3600 (default 20).
    pub writeback_fail_timeout_s: u32,
    /// The cleaner moves the live lines of a log segment to the head of the log (on
    /// the cache device) instead of writing them back when at most this share of the
    /// segment's lines is live, in percent; written as a fraction `0`..=`0.95`
    /// (default 0.8). 0 turns moving off (log space comes from writeback alone).
    pub clean_live_max: u32,
    /// Format 2: write a checkpoint of the index once this many segments were made
    /// durable since the last one, and at a clean stop; 0 = never write checkpoints
    /// (recovery then walks the whole dirty log), 0..=1000000 (default 256).
    pub checkpoint_interval_segments: u32,
    /// Format 2: while flushes come often, the flusher writes the open segment's lines
    /// to its slot once this many have accumulated, so a flush then writes little more
    /// than a header; 0 = never (a flush writes every line since the last one),
    /// 0..=1024 (default 0: in the test guest staging cost durable random writes a
    /// third of their speed, natively it won 6 %; docs/CONFIG.md).
    pub stage_lines: u32,
    /// Read caching: a line read whole from a backing device (not cached) is promoted
    /// into the cache as a clean copy at its N-th such miss; 0 = never promote,
    /// 0..=1000 (default 1: at the first miss).
    pub read_promote_threshold: u32,
    /// Reads continuing a sequential stream longer than this many bytes are not
    /// promoted, and such writes go around the cache when none of their lines is
    /// cached and the log is at least half `writeback_threshold` dirty (a backup or
    /// copy does not push cached data out); 0 = no cutoff (default 4 MiB).
    pub sequential_cutoff: u64,
}

impl Default for Tunables {
    fn default() -> Self {
        Tunables {
            writeback_enabled: true,
            writeback_force: false,
            writeback_threshold: 70,
            writeback_batch: 8,
            writeback_sort: true,
            barrier_deadline_ms: 3,
            superblock_commit_interval_s: 10,
            flush_interval_s: 5,
            writeback_fail_timeout_s: 20,
            clean_live_max: 80,
            checkpoint_interval_segments: 256,
            stage_lines: 0,
            read_promote_threshold: 1,
            sequential_cutoff: 4 << 20,
        }
    }
}

/// Every tunable name, for listings.
pub const NAMES: &[&str] = &[
    "writeback_enabled",
    "writeback_force",
    "writeback_threshold",
    "writeback_batch",
    "writeback_sort",
    "barrier_deadline_ms",
    "superblock_commit_interval_s",
    "flush_interval_s",
    "writeback_fail_timeout_s",
    "clean_live_max",
    "checkpoint_interval_segments",
    "stage_lines",
    "read_promote_threshold",
    "sequential_cutoff",
];

fn parse_bool(key: &str, v: &str) -> Result<bool> {
    match v {
        "1" | "true" | "on" | "yes" => Ok(true),
        "0" | "false" | "off" | "no" => Ok(false),
        _ => Err(Error::Tunable {
            key: key.into(),
            reason: format!("{v:?} is not a boolean (true/false/1/0)"),
        }),
    }
}

fn parse_range(key: &str, v: &str, lo: u32, hi: u32) -> Result<u32> {
    let n: u32 = v.parse().map_err(|_| Error::Tunable {
        key: key.into(),
        reason: format!("{v:?} is not a number"),
    })?;
    if n < lo || n > hi {
        return Err(Error::Tunable {
            key: key.into(),
            reason: format!("{n} out of range {lo}..={hi}"),
        });
    }
    Ok(n)
}

/// A fraction `0`..=`hi` percent written as a decimal (`0.8`) or a percentage (`80%`),
/// kept as whole percent.
fn parse_fraction(key: &str, v: &str, hi: u32) -> Result<u32> {
    let bad = |reason: String| Error::Tunable {
        key: key.into(),
        reason,
    };
    let pct = match v.strip_suffix('%') {
        Some(p) => p
            .trim()
            .parse::<f64>()
            .map_err(|_| bad(format!("{v:?} is not a percentage")))?,
        None => {
            v.parse::<f64>()
                .map_err(|_| bad(format!("{v:?} is not a fraction (e.g. 0.8)")))?
                * 100.0
        }
    };
    if !(0.0..=hi as f64 + 1e-9).contains(&pct) {
        return Err(bad(format!("{v} out of range 0..={}", hi as f64 / 100.0)));
    }
    Ok(pct.round() as u32)
}

impl Tunables {
    /// Sets one tunable from its text form; the value is validated first.
    pub fn set(&mut self, key: &str, value: &str) -> Result<()> {
        let v = value.trim();
        match key {
            "writeback_enabled" => self.writeback_enabled = parse_bool(key, v)?,
            "writeback_force" => self.writeback_force = parse_bool(key, v)?,
            "writeback_sort" => self.writeback_sort = parse_bool(key, v)?,
            "writeback_threshold" => self.writeback_threshold = parse_range(key, v, 0, 100)?,
            "writeback_batch" => self.writeback_batch = parse_range(key, v, 1, 64)?,
            "barrier_deadline_ms" => self.barrier_deadline_ms = parse_range(key, v, 0, 1000)?,
            "superblock_commit_interval_s" => {
                self.superblock_commit_interval_s = parse_range(key, v, 1, 3600)?
            }
            "flush_interval_s" => self.flush_interval_s = parse_range(key, v, 0, 3600)?,
            "writeback_fail_timeout_s" => {
                self.writeback_fail_timeout_s = parse_range(key, v, 1, 3600)?
            }
            "clean_live_max" => self.clean_live_max = parse_fraction(key, v, 95)?,
            "checkpoint_interval_segments" => {
                self.checkpoint_interval_segments = parse_range(key, v, 0, 1_000_000)?
            }
            "stage_lines" => self.stage_lines = parse_range(key, v, 0, 1024)?,
            "read_promote_threshold" => self.read_promote_threshold = parse_range(key, v, 0, 1000)?,
            "sequential_cutoff" => {
                self.sequential_cutoff = v.parse().map_err(|_| Error::Tunable {
                    key: key.into(),
                    reason: format!("{v:?} is not a number of bytes"),
                })?
            }
            _ => {
                return Err(Error::Tunable {
                    key: key.into(),
                    reason: format!("unknown tunable; known: {}", NAMES.join(", ")),
                })
            }
        }
        Ok(())
    }

    /// Every tunable as (name, value text).
    pub fn list(&self) -> Vec<(&'static str, String)> {
        vec![
            ("writeback_enabled", self.writeback_enabled.to_string()),
            ("writeback_force", self.writeback_force.to_string()),
            ("writeback_threshold", self.writeback_threshold.to_string()),
            ("writeback_batch", self.writeback_batch.to_string()),
            ("writeback_sort", self.writeback_sort.to_string()),
            ("barrier_deadline_ms", self.barrier_deadline_ms.to_string()),
            (
                "superblock_commit_interval_s",
                self.superblock_commit_interval_s.to_string(),
            ),
            ("flush_interval_s", self.flush_interval_s.to_string()),
            (
                "writeback_fail_timeout_s",
                self.writeback_fail_timeout_s.to_string(),
            ),
            (
                "clean_live_max",
                (self.clean_live_max as f64 / 100.0).to_string(),
            ),
            (
                "checkpoint_interval_segments",
                self.checkpoint_interval_segments.to_string(),
            ),
            ("stage_lines", self.stage_lines.to_string()),
            (
                "read_promote_threshold",
                self.read_promote_threshold.to_string(),
            ),
            ("sequential_cutoff", self.sequential_cutoff.to_string()),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_validates_every_key() {
        let mut t = Tunables::default();
        t.set("writeback_threshold", "50").unwrap();
        assert_eq!(t.writeback_threshold, 50);
        assert!(t.set("writeback_threshold", "101").is_err());
        assert!(t.set("writeback_batch", "0").is_err());
        assert!(t.set("writeback_enabled", "maybe").is_err());
        t.set("clean_live_max", "0.5").unwrap();
        assert_eq!(t.clean_live_max, 50);
        t.set("clean_live_max", "35%").unwrap();
        assert_eq!(t.clean_live_max, 35);
        assert!(t.set("clean_live_max", "0.96").is_err());
        assert!(t.set("clean_live_max", "-0.1").is_err());
        assert!(t.set("clean_live_max", "x").is_err());
        t.set("read_promote_threshold", "3").unwrap();
        assert_eq!(t.read_promote_threshold, 3);
        assert!(t.set("read_promote_threshold", "1001").is_err());
        t.set("sequential_cutoff", "0").unwrap();
        assert_eq!(t.sequential_cutoff, 0);
        assert!(t.set("sequential_cutoff", "4M").is_err());
        assert!(t
            .set("nope", "1")
            .unwrap_err()
            .to_string()
            .contains("unknown"));
        for (k, v) in Tunables::default().list() {
            t.set(k, &v).unwrap();
        }
        assert_eq!(t, Tunables::default());
        assert_eq!(t.list().len(), NAMES.len());
    }
}
