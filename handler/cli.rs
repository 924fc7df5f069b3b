//! The `lc` subcommands that talk to a running daemon, and logger setup. `main.rs`
//! parses arguments and calls these.

use std::path::Path;

use serde_json::Value;
use slog::{o, Drain, Logger};

use crate::api::{Accepted, CacheStatus, LunStatus, Reloaded, Request, StatsReply, Status};
use crate::control::request;
use crate::error::{Error, Result};

/// The daemon's logger at `level` (error, warning, info, debug). Under systemd
/// (stderr is the journal: `JOURNAL_STREAM` names it) each line carries its syslog
/// priority as a `<N>` prefix and no timestamp of its own, so `journalctl -p err`
/// finds errors and the journal's timestamp is the only one; on a terminal, the
/// usual timestamped lines.
pub fn logger(level: &str) -> Logger {
    set_log_level(level);
    let wanted = |r: &slog::Record| {
        r.level().as_usize() <= LOG_LEVEL.load(std::sync::atomic::Ordering::Relaxed)
    };
    if journal_is_stderr() {
        let drain = std::sync::Mutex::new(JournalDrain).filter(wanted).fuse();
        return Logger::root(drain, o!());
    }
    let decorator = slog_term::PlainSyncDecorator::new(std::io::stderr());
    let drain = slog_term::FullFormat::new(decorator)
        .build()
        .filter(wanted)
        .fuse();
    Logger::root(drain, o!())
}

/// The most verbose level the daemon's logger lets through (`slog::Level::as_usize`).
static LOG_LEVEL: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(4); // slog::Level::Info

/// Changes the log level of the logger [`logger`] made (a config reload).
pub fn set_log_level(level: &str) {
    let lvl = match level {
        "error" => slog::Level::Error,
        "warning" => slog::Level::Warning,
        "debug" => slog::Level::Debug,
        _ => slog::Level::Info,
    };
    LOG_LEVEL.store(lvl.as_usize(), std::sync::atomic::Ordering::Relaxed);
}

/// True when stderr is the stream `JOURNAL_STREAM` (`device:inode`) names.
fn journal_is_stderr() -> bool {
    use std::os::unix::fs::MetadataExt;
    let Ok(v) = std::env::var("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = v.split_once(':') else {
        return false;
    };
    let fd = std::io::stderr();
    let Ok(meta) = std::os::fd::AsFd::as_fd(&fd)
        .try_clone_to_owned()
        .map(std::fs::File::from)
        .and_then(|f| f.metadata())
    else {
        return false;
    };
    dev.parse() == Ok(meta.dev()) && ino.parse() == Ok(meta.ino())
}

/// syslog priority of a log level (sd-daemon(3) prefixes).
pub fn syslog_priority(level: slog::Level) -> u8 {
    match level {
        slog::Level::Critical => 2,
        slog::Level::Error => 3,
        slog::Level::Warning => 4,
        slog::Level::Info => 6,
        slog::Level::Debug | slog::Level::Trace => 7,
    }
}

/// Writes `<prio>message, key: value, ...` lines to stderr, one write each.
struct JournalDrain;

impl Drain for JournalDrain {
    type Ok = ();
    type Err = std::io::Error;
    fn log(&self, r: &slog::Record, kv: &slog::OwnedKVList) -> std::io::Result<()> {
        let mut line = format!("<{}>{}", syslog_priority(r.level()), r.msg());
        let mut ser = KvText(&mut line);
        slog::KV::serialize(&r.kv(), r, &mut ser).map_err(std::io::Error::other)?;
        slog::KV::serialize(kv, r, &mut ser).map_err(std::io::Error::other)?;
        line.push('\n');
        std::io::Write::write_all(&mut std::io::stderr().lock(), line.as_bytes())
    }
}

/// Appends `, key: value` for each pair.
struct KvText<'a>(&'a mut String);

impl slog::Serializer for KvText<'_> {
    fn emit_arguments(&mut self, key: slog::Key, val: &std::fmt::Arguments) -> slog::Result {
        use std::fmt::Write;
        write!(self.0, ", {key}: {val}").map_err(|_| slog::Error::Other)
    }
}

/// The table of a `status` answer: caches, then LUNs.
fn status_table(v: &Status) -> String {
    let mut out = String::new();
    out += "CACHE      DEVICE                          SEGMENTS  DIRTY  WRITTEN-BACK  STATE\n";
    for c in &v.caches {
        out += &format!(
            "{:<10} {:<31} {:>8} {:>6} {:>13}  {}\n",
            c.name,
            c.device,
            c.nr_segments,
            c.dirty_segments,
            c.last_writeback_id,
            cache_state(c)
        );
    }
    out += "\nLUN        CACHE      ID  BACKING                         SERVED-BY  DIRTY-LINES  LOST-LINES  STATE\n";
    for l in &v.luns {
        let (name, cache, id, backing, served_by, dirty, lost, state) = match l {
            LunStatus::Cached(l) => (
                &l.name,
                &l.cache,
                l.backing_id.to_string(),
                &l.backing,
                &l.served_by,
                l.dirty_lines,
                if l.unreadable_after_damage {
                    "unknown".to_string()
                } else {
                    l.lost_lines.to_string()
                },
                match l.writeback_failing_since {
                    Some(t) => format!(
                        "writeback failing since {} ({})",
                        utc(t),
                        l.writeback_error.as_deref().unwrap_or("")
                    ),
                    None => "ok".into(),
                },
            ),
            LunStatus::Ram(l) => (
                &l.name,
                &l.cache,
                "-".to_string(),
                &l.backing,
                &l.served_by,
                l.dirty_lines,
                l.lost_lines.to_string(),
                "ok".into(),
            ),
        };
        out += &format!(
            "{:<10} {:<10} {:>3}  {:<31} {:<10} {:>11}  {:>10}  {}\n",
            name,
            cache,
            id,
            backing,
            served_by.as_deref().unwrap_or("-"),
            dirty,
            lost,
            state
        );
    }
    out
}

/// The lines of a `reload` answer.
fn reload_text(v: &Reloaded) -> String {
    let mut out = String::new();
    if v.reloaded.is_empty() {
        out += "configuration reloaded: nothing changed\n";
    }
    for c in &v.reloaded {
        out += &format!("reloaded: {c}\n");
    }
    out
}

/// The lines of a `scrub` answer: what was checked, what was found, what is lost.
fn scrubbed_text(s: &crate::api::Scrubbed) -> String {
    let mut t = format!(
        "{}: {} lines in {} segments checked ({} read), {} rotten\n",
        s.cache,
        s.lines,
        s.segments,
        crate::units::human(s.bytes_read),
        s.rotten
    );
    // What is lost now (found by this scrub or before; an accepted loss is not).
    if let Some(d) = s.damage.as_ref().filter(|d| !d.lost_ranges.is_empty()) {
        t += &format!(
            "DAMAGED: segments {}; reads of these sectors fail until rewritten or `lc accept-loss`:\n",
            json(&d.segments)
        );
        t += &lost_lines(&d.lost_ranges, "");
    }
    t
}

/// One line per lost sector range: `lost: backing ID (LUN) sectors FIRST..+N` and `tail`.
fn lost_lines(ranges: &[crate::api::LostRange], tail: &str) -> String {
    ranges
        .iter()
        .map(|r| {
            format!(
                "lost: backing {} ({}) sectors {}..+{}{tail}\n",
                r.backing_id,
                r.lun.as_deref().unwrap_or("-"),
                r.sector,
                r.sectors
            )
        })
        .collect()
}

/// The lines of an `accept_loss` answer.
fn accepted_text(v: &Accepted) -> String {
    let a = &v.accepted;
    let mut out = format!("damaged segments {}: loss accepted\n", json(&a.segments));
    out += &lost_lines(&a.lost_ranges, " now read older data");
    if let Some(s) = a.unknown_after_segment {
        out += &format!("lines not rewritten since segment {s} now read older data\n");
    }
    out
}

/// The lines of a `stats` answer: every field of each cache, `counters` and
/// `tunables` one per line.
fn stats_text(v: &StatsReply) -> String {
    let mut out = String::new();
    for (name, s) in &v.stats {
        out += &format!("cache {name}\n");
        // Through a JSON object: every field, sorted by name, values as JSON.
        if let Value::Object(m) = serde_json::to_value(s).unwrap_or_default() {
            for (k, val) in m {
                if k == "counters" || k == "tunables" {
                    if let Some(inner) = val.as_object() {
                        for (ik, iv) in inner {
                            out += &format!("  {k}.{ik:<28} {iv}\n");
                        }
                    }
                } else {
                    out += &format!("  {k:<37} {val}\n");
                }
            }
        }
    }
    out
}

/// A value as compact JSON.
fn json<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string(v).unwrap_or_default()
}

/// The text `lc` prints for the answer `v` to `req` (empty for answers without
/// fields).
fn table(req: &Request, v: Value) -> Result<String> {
    fn parse<T: serde::de::DeserializeOwned>(v: Value) -> Result<T> {
        let line = v.to_string();
        serde_json::from_value(v).map_err(|source| Error::BadResponse { line, source })
    }
    Ok(match req {
        Request::Status => status_table(&parse(v)?),
        Request::Stats { .. } => stats_text(&parse(v)?),
        Request::Reload => reload_text(&parse(v)?),
        Request::AcceptLoss { .. } => accepted_text(&parse(v)?),
        Request::Scrub { .. } => scrubbed_text(&parse(v)?),
        _ => String::new(),
    })
}

/// RFC 3339 UTC time of seconds since the epoch.
fn utc(t: u64) -> String {
    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + std::time::Duration::from_secs(t))
        .to_string()
}

/// The STATE column of a cache: failed, damaged (and what is lost), or ok.
fn cache_state(c: &CacheStatus) -> String {
    if let Some(f) = &c.failure {
        return format!("FAILED: {f}");
    }
    let Some(d) = &c.damage else {
        return "ok".into();
    };
    let lost: u64 = d.lost_lines.iter().map(|x| x.lines).sum();
    let unknown = d.unknown_after_segment.map_or(String::new(), |s| {
        format!(", lines not rewritten since segment {s} unreadable")
    });
    if lost == 0 && unknown.is_empty() {
        return format!(
            "ok (damaged segments {} kept until written back)",
            json(&d.segments)
        );
    }
    let held = if d.recorded {
        " (recorded: the log goes on)"
    } else {
        ""
    };
    format!(
        "DAMAGED: segments {} lost {lost} lines{unknown}{held}; rewrite them or `lc accept-loss`",
        json(&d.segments)
    )
}

/// Prints the daemon's statistics in the Prometheus text exposition format.
pub fn prometheus(socket: &Path, cache: Option<String>) -> Result<()> {
    let req = Request::Stats { cache };
    let v = request(socket, &req, &mut |_| {})?;
    let line = v.to_string();
    let stats = serde_json::from_value(v).map_err(|source| Error::BadResponse { line, source })?;
    print!("{}", prometheus_text(&stats));
    Ok(())
}

/// The Prometheus text for a `stats` answer: per cache and per LUN.
pub fn prometheus_text(v: &StatsReply) -> String {
    let esc = |s: &str| s.replace('\\', "\\\\").replace('"', "\\\"");
    let mut families: Vec<(&str, &str, &str, Vec<String>)> = vec![
        (
            "lc_line_accesses_total",
            "counter",
            "Cache line accesses (dm-lc's 16 counters): op read|write, hit, ram, full line.",
            vec![],
        ),
        (
            "lc_hit_ratio",
            "gauge",
            "Share of line accesses that hit the cache, per op.",
            vec![],
        ),
        (
            "lc_dirty_lines",
            "gauge",
            "Dirty 4 KiB lines not yet written back.",
            vec![],
        ),
        (
            "lc_lost_lines",
            "gauge",
            "Lines whose newest data was lost to cache-device damage.",
            vec![],
        ),
        (
            "lc_writeback_failing",
            "gauge",
            "1 while writeback to the LUN's backing device fails.",
            vec![],
        ),
        (
            "lc_dirty_segments",
            "gauge",
            "Log segments holding dirty data.",
            vec![],
        ),
        (
            "lc_segments",
            "gauge",
            "Log segment slots of the cache device.",
            vec![],
        ),
        (
            "lc_cache_bytes_written_total",
            "counter",
            "Bytes written to the cache device.",
            vec![],
        ),
        (
            "lc_backing_bytes_written_total",
            "counter",
            "Bytes written back to backing devices.",
            vec![],
        ),
        (
            "lc_live_lines",
            "gauge",
            "Log lines holding the newest copy of a cached line.",
            vec![],
        ),
        (
            "lc_stale_lines",
            "gauge",
            "Log lines superseded by a newer copy (space the cleaner can reclaim).",
            vec![],
        ),
        (
            "lc_moved_lines_total",
            "counter",
            "Lines the cleaner moved to the head of the log instead of writing them back.",
            vec![],
        ),
        (
            "lc_rotten_copies_total",
            "counter",
            "Line copies (or segment headers) found rotten on the cache device: media damage.",
            vec![],
        ),
        (
            "lc_cleaner_read_bytes_total",
            "counter",
            "Bytes the cleaner read from the cache device (segment headers and live lines).",
            vec![],
        ),
        (
            "lc_written_back_lines_total",
            "counter",
            "Line copies written back to backing devices.",
            vec![],
        ),
        (
            "lc_promoted_lines_total",
            "counter",
            "Lines promoted into the cache on read misses (clean copies).",
            vec![],
        ),
        (
            "lc_bypassed_bytes_total",
            "counter",
            "Bytes written around the cache to backing devices (sequential streams past sequential_cutoff).",
            vec![],
        ),
        (
            "lc_failed",
            "gauge",
            "1 once the cache device failed.",
            vec![],
        ),
    ];
    let mut add = |name: &str, labels: String, value: String| {
        if let Some(f) = families.iter_mut().find(|f| f.0 == name) {
            f.3.push(format!("{name}{{{labels}}} {value}"));
        }
    };
    for (cache, s) in &v.stats {
        let c = format!("cache=\"{}\"", esc(cache));
        for (n, name) in [
            (s.dirty_segments, "lc_dirty_segments"),
            (s.nr_segments, "lc_segments"),
            (s.cache_bytes_written, "lc_cache_bytes_written_total"),
            (s.backing_bytes_written, "lc_backing_bytes_written_total"),
            (s.live_lines, "lc_live_lines"),
            (s.stale_lines, "lc_stale_lines"),
            (s.moved_lines, "lc_moved_lines_total"),
            (s.rotten_found, "lc_rotten_copies_total"),
            (s.cleaner_bytes_read, "lc_cleaner_read_bytes_total"),
            (s.written_back_lines, "lc_written_back_lines_total"),
            (s.promoted_lines, "lc_promoted_lines_total"),
            (s.bypassed_bytes, "lc_bypassed_bytes_total"),
        ] {
            add(name, c.clone(), n.to_string());
        }
        add(
            "lc_failed",
            c.clone(),
            (s.failure.is_some() as u8).to_string(),
        );
        for l in &s.luns {
            let lun = format!("{c},lun=\"{}\"", esc(&l.lun));
            let mut totals = [[0u64; 2]; 2]; // [op][hit]
            for (name, &n) in &l.counters {
                let parts: Vec<&str> = name.split('_').collect();
                let &[op, hit, at, size] = parts.as_slice() else {
                    continue;
                };
                totals[(op == "write") as usize][(hit == "hit") as usize] += n;
                add(
                    "lc_line_accesses_total",
                    format!("{lun},op=\"{op}\",result=\"{hit}\",where=\"{at}\",size=\"{size}\""),
                    n.to_string(),
                );
            }
            for (i, op) in ["read", "write"].iter().enumerate() {
                let all = totals[i][0] + totals[i][1];
                if all > 0 {
                    let ratio = totals[i][1] as f64 / all as f64;
                    add(
                        "lc_hit_ratio",
                        format!("{lun},op=\"{op}\""),
                        format!("{ratio:.4}"),
                    );
                }
            }
            add("lc_dirty_lines", lun.clone(), l.dirty_lines.to_string());
            add("lc_lost_lines", lun.clone(), l.lost_lines.to_string());
            add(
                "lc_writeback_failing",
                lun,
                (l.writeback_failing as u8).to_string(),
            );
        }
    }
    let mut out = String::new();
    for (name, kind, help, samples) in families {
        if samples.is_empty() {
            continue;
        }
        out += &format!("# HELP {name} {help}\n# TYPE {name} {kind}\n");
        for s in samples {
            out += &s;
            out.push('\n');
        }
    }
    out
}

/// Sends `req` and prints the answer (a table, or JSON with `json`).
pub fn run(socket: &Path, req: Request, json: bool) -> Result<()> {
    let template = match req {
        Request::Drain { .. } => Some("draining {bar:40} {pos}/{len} lines written back ({eta})"),
        Request::Scrub { .. } => Some("scrubbing {bar:40} {pos}/{len} segments checked ({eta})"),
        _ => None,
    };
    let bar = template.map(|t| {
        let b = indicatif::ProgressBar::new(0);
        b.set_style(
            indicatif::ProgressStyle::with_template(t)
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        b
    });
    let v = request(socket, &req, &mut |p| {
        if let Some(b) = &bar {
            b.set_length(p.total);
            b.set_position(p.total.saturating_sub(p.remaining));
        }
    })?;
    if let Some(b) = bar {
        b.finish();
    }
    if json {
        println!("{v}");
    } else {
        let t = table(&req, v)?;
        if !t.is_empty() {
            print!("{t}");
        }
    }
    Ok(())
}
