//! The control protocol (`docs/CONTROL.md`): line-delimited JSON over a root-only Unix
//! socket. The daemon accepts connections from its event loop and serves each on a
//! short-lived thread (a drain can take minutes); the CLI uses [`request`].

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

/// Longest request line accepted.
pub const MAX_LINE: usize = 64 << 10;

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
    /// The operator accepts data lost to cache log damage: reply with what was lost,
    /// then stop refusing reads of it (older data becomes readable).
    AcceptLoss {
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

/// What the daemon does with requests; `progress` receives intermediate lines.
pub trait Handler: Send + Sync {
    /// Serves one request; returns the final response object (without "ok").
    fn handle(&self, req: Request, progress: &mut dyn FnMut(Value)) -> Result<Value, String>;
}

/// Creates the socket: a stale socket file is replaced, a live one refused; 0600.
pub fn listen(path: &Path) -> Result<UnixListener, String> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    if path.exists() {
        if UnixStream::connect(path).is_ok() {
            return Err(format!(
                "{}: another lc daemon is listening there",
                path.display()
            ));
        }
        std::fs::remove_file(path).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    let l = UnixListener::bind(path).map_err(|e| format!("{}: {e}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| format!("{}: {e}", path.display()))?;
    l.set_nonblocking(true).map_err(|e| e.to_string())?;
    Ok(l)
}

/// Accepts every pending connection and serves each on its own thread.
pub fn accept_all(l: &UnixListener, handler: &Arc<dyn Handler>) {
    while let Ok((s, _)) = l.accept() {
        let h = handler.clone();
        let _ = std::thread::Builder::new()
            .name("lc-control".into())
            .spawn(move || serve_conn(s, h.as_ref()));
    }
}

fn write_line(s: &mut UnixStream, v: &Value) -> std::io::Result<()> {
    let mut t = v.to_string();
    t.push('\n');
    s.write_all(t.as_bytes())
}

/// Serves one connection until it closes: one response (plus progress lines) per line.
pub fn serve_conn(s: UnixStream, handler: &dyn Handler) {
    let _ = s.set_nonblocking(false);
    let Ok(mut w) = s.try_clone() else { return };
    let mut r = BufReader::new(s);
    loop {
        let mut line = String::new();
        match std::io::Read::take(&mut r, MAX_LINE as u64 + 1).read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(n) if n > MAX_LINE => {
                let _ = write_line(
                    &mut w,
                    &json!({"ok": false, "error": format!("request longer than {MAX_LINE} bytes")}),
                );
                return;
            }
            Ok(_) => {}
        }
        if line.trim().is_empty() {
            continue;
        }
        let resp = match serde_json::from_str::<Request>(line.trim()) {
            Err(e) => json!({"ok": false, "error": format!("bad request: {e}")}),
            Ok(req) => {
                let mut w2 = match w.try_clone() {
                    Ok(x) => x,
                    Err(_) => return,
                };
                let mut progress = |v: Value| {
                    let _ = write_line(&mut w2, &json!({ "progress": v }));
                };
                match handler.handle(req, &mut progress) {
                    Ok(Value::Object(mut m)) => {
                        m.insert("ok".into(), Value::Bool(true));
                        Value::Object(m)
                    }
                    Ok(other) => json!({"ok": true, "result": other}),
                    Err(e) => json!({"ok": false, "error": e}),
                }
            }
        };
        if write_line(&mut w, &resp).is_err() {
            return;
        }
    }
}

/// Sends a request and returns the final response; progress lines go to `progress`.
pub fn request(
    path: &Path,
    req: &Request,
    progress: &mut dyn FnMut(&Value),
) -> Result<Value, String> {
    let mut s = UnixStream::connect(path).map_err(|e| {
        format!(
            "cannot reach the lc daemon at {}: {e} (is `lc serve` running?)",
            path.display()
        )
    })?;
    s.set_read_timeout(Some(Duration::from_secs(24 * 3600)))
        .ok();
    let mut line = serde_json::to_string(req).map_err(|e| e.to_string())?;
    line.push('\n');
    s.write_all(line.as_bytes()).map_err(|e| e.to_string())?;
    let mut r = BufReader::new(s);
    loop {
        let mut l = String::new();
        if r.read_line(&mut l).map_err(|e| e.to_string())? == 0 {
            return Err("the daemon closed the connection".into());
        }
        let v: Value = serde_json::from_str(&l).map_err(|e| format!("bad response {l:?}: {e}"))?;
        if let Some(p) = v.get("progress") {
            progress(p);
            continue;
        }
        return if v["ok"] == Value::Bool(true) {
            Ok(v)
        } else {
            Err(v["error"].as_str().unwrap_or("unknown error").to_string())
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo;
    impl Handler for Echo {
        fn handle(&self, req: Request, progress: &mut dyn FnMut(Value)) -> Result<Value, String> {
            match req {
                Request::Drain { lun } => {
                    for i in (0..3).rev() {
                        progress(json!({"remaining": i, "total": 3}));
                    }
                    Ok(json!({ "drained": lun }))
                }
                Request::Set { key, .. } if key == "bad" => Err("tunable bad: unknown".into()),
                other => Ok(json!({ "echo": serde_json::to_value(other).unwrap() })),
            }
        }
    }

    fn server() -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("run/control.sock");
        let l = listen(&p).unwrap();
        let h: Arc<dyn Handler> = Arc::new(Echo);
        std::thread::spawn(move || loop {
            accept_all(&l, &h);
            std::thread::sleep(Duration::from_millis(5));
        });
        (dir, p)
    }

    #[test]
    fn requests_round_trip_with_progress_and_errors() {
        let (_d, p) = server();
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let v = request(&p, &Request::Status, &mut |_| {}).unwrap();
        assert_eq!(v["echo"]["cmd"], "status");
        let mut seen = Vec::new();
        let v = request(
            &p,
            &Request::Drain {
                lun: "disk0".into(),
            },
            &mut |p| seen.push(p["remaining"].as_u64().unwrap()),
        )
        .unwrap();
        assert_eq!(v["drained"], "disk0");
        assert_eq!(seen, vec![2, 1, 0]);
        let e = request(
            &p,
            &Request::Set {
                cache: "c".into(),
                key: "bad".into(),
                value: "1".into(),
            },
            &mut |_| {},
        )
        .unwrap_err();
        assert!(e.contains("unknown"));
        assert!(listen(&p).unwrap_err().contains("another lc daemon"));
    }

    #[test]
    fn malformed_lines_get_errors_not_disconnects() {
        let (_d, p) = server();
        let mut s = UnixStream::connect(&p).unwrap();
        s.write_all(b"{not json\n{\"cmd\":\"explode\"}\n{\"cmd\":\"stats\"}\n")
            .unwrap();
        let mut r = BufReader::new(s.try_clone().unwrap());
        for want in [false, false, true] {
            let mut l = String::new();
            r.read_line(&mut l).unwrap();
            let v: Value = serde_json::from_str(&l).unwrap();
            assert_eq!(v["ok"], Value::Bool(want), "{l}");
        }
        s.write_all(&vec![b'x'; MAX_LINE + 10]).unwrap();
        s.write_all(b"\n").unwrap();
        let mut l = String::new();
        r.read_line(&mut l).unwrap();
        assert!(l.contains("longer than"));
    }

    #[test]
    fn stale_socket_files_are_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.sock");
        drop(UnixListener::bind(&p).unwrap());
        assert!(p.exists());
        listen(&p).unwrap();
    }
}
