//! The `lc` subcommands that talk to a running daemon, and logger setup. `main.rs`
//! parses arguments and calls these.

use std::path::Path;

use serde_json::Value;
use slog::{o, Drain, Logger};

use crate::control::{request, Request};

/// The daemon's logger at `level` (error, warning, info, debug). Under systemd
/// (stderr is the journal: `JOURNAL_STREAM` names it) each line carries its syslog
/// priority as a `<N>` prefix and no timestamp of its own, so `journalctl -p err`
/// finds errors and the journal's timestamp is the only one; on a terminal, the
/// usual timestamped lines.
pub fn logger(level: &str) -> Logger {
    let lvl = match level {
        "error" => slog::Level::Error,
        "warning" => slog::Level::Warning,
        "debug" => slog::Level::Debug,
        _ => slog::Level::Info,
    };
    if journal_is_stderr() {
        let drain = std::sync::Mutex::new(JournalDrain).filter_level(lvl).fuse();
        return Logger::root(drain, o!());
    }
    let decorator = slog_term::PlainSyncDecorator::new(std::io::stderr());
    let drain = slog_term::FullFormat::new(decorator)
        .build()
        .filter_level(lvl)
        .fuse();
    Logger::root(drain, o!())
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

impl slog::Drain for JournalDrain {
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

fn table(v: &Value) -> String {
    let mut out = String::new();
    if let Some(caches) = v["caches"].as_array() {
        out += "CACHE      DEVICE                          SEGMENTS  DIRTY  WRITTEN-BACK  STATE\n";
        for c in caches {
            out += &format!(
                "{:<10} {:<31} {:>8} {:>6} {:>13}  {}\n",
                c["name"].as_str().unwrap_or(""),
                c["device"].as_str().unwrap_or(""),
                c["nr_segments"].as_u64().unwrap_or(0),
                c["dirty_segments"].as_u64().unwrap_or(0),
                c["last_writeback_id"].as_u64().unwrap_or(0),
                cache_state(c)
            );
        }
    }
    if let Some(luns) = v["luns"].as_array() {
        out +=
            "\nLUN        CACHE      ID  BACKING                         SERVED-BY  DIRTY-LINES  LOST-LINES  STATE\n";
        for l in luns {
            let lost = match (
                l["lost_lines"].as_u64(),
                l["unreadable_after_damage"].as_bool(),
            ) {
                (_, Some(true)) => "unknown".to_string(),
                (Some(n), _) => n.to_string(),
                _ => "0".to_string(),
            };
            out += &format!(
                "{:<10} {:<10} {:>3}  {:<31} {:<10} {:>11}  {:>10}  {}\n",
                l["name"].as_str().unwrap_or(""),
                l["cache"].as_str().unwrap_or(""),
                l["backing_id"].as_u64().unwrap_or(0),
                l["backing"].as_str().unwrap_or(""),
                l["served_by"].as_str().unwrap_or("-"),
                l["dirty_lines"].as_u64().unwrap_or(0),
                lost,
                match l["writeback_failing_since"].as_u64() {
                    Some(t) => format!(
                        "writeback failing since {} ({})",
                        utc(t),
                        l["writeback_error"].as_str().unwrap_or("")
                    ),
                    None => "ok".into(),
                }
            );
        }
    }
    if let Some(a) = v.get("accepted").filter(|a| !a.is_null()) {
        out += &format!("damaged segments {}: loss accepted\n", a["segments"]);
        for r in a["lost_ranges"].as_array().into_iter().flatten() {
            out += &format!(
                "lost: backing {} ({}) sectors {}..+{} now read older data\n",
                r["backing_id"],
                r["lun"].as_str().unwrap_or("-"),
                r["sector"],
                r["sectors"]
            );
        }
        if let Some(s) = a["unknown_after_segment"].as_u64() {
            out += &format!("lines not rewritten since segment {s} now read older data\n");
        }
    }
    if let Some(stats) = v["stats"].as_object() {
        for (name, s) in stats {
            out += &format!("cache {name}\n");
            if let Some(m) = s.as_object() {
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
    }
    out
}

/// RFC 3339 UTC time of seconds since the epoch.
fn utc(t: u64) -> String {
    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + std::time::Duration::from_secs(t))
        .to_string()
}

/// The STATE column of a cache: failed, damaged (and what is lost), or ok.
fn cache_state(c: &Value) -> String {
    if let Some(f) = c["failure"].as_str() {
        return format!("FAILED: {f}");
    }
    let d = &c["damage"];
    if d.is_null() {
        return "ok".into();
    }
    let lost: u64 = d["lost_lines"]
        .as_array()
        .map_or(0, |a| a.iter().filter_map(|x| x["lines"].as_u64()).sum());
    let unknown = d["unknown_after_segment"]
        .as_u64()
        .map_or(String::new(), |s| {
            format!(", lines not rewritten since segment {s} unreadable")
        });
    if lost == 0 && unknown.is_empty() {
        return format!(
            "ok (damaged segments {} kept until written back)",
            d["segments"]
        );
    }
    format!(
        "DAMAGED: segments {} lost {lost} lines{unknown}; rewrite them or `lc accept-loss`",
        d["segments"]
    )
}

/// Sends `req` and prints the answer (a table, or JSON with `json`).
pub fn run(socket: &Path, req: Request, json: bool) -> Result<(), String> {
    let drain = matches!(req, Request::Drain { .. });
    let bar = drain.then(|| {
        let b = indicatif::ProgressBar::new(0);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "draining {bar:40} {pos}/{len} lines written back ({eta})",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        b
    });
    let v = request(socket, &req, &mut |p| {
        if let Some(b) = &bar {
            let total = p["total"].as_u64().unwrap_or(0);
            let remaining = p["remaining"].as_u64().unwrap_or(0);
            b.set_length(total);
            b.set_position(total.saturating_sub(remaining));
        }
    })?;
    if let Some(b) = bar {
        b.finish();
    }
    if json {
        println!("{v}");
    } else {
        let t = table(&v);
        if !t.is_empty() {
            print!("{t}");
        }
    }
    Ok(())
}
