//! The control protocol (`docs/CONTROL.md`): line-delimited JSON over a root-only Unix
//! socket. The daemon accepts connections from its event loop and serves each on a
//! short-lived thread (a drain can take minutes); the CLI uses [`request`].
//!
//! The socket never exists under its name with another mode than 0600: it is bound in
//! a fresh 0700 directory beside it, made 0600 there, and renamed into place. Its
//! directory must belong to root (or the daemon's user) and be writable by nobody
//! else unless sticky. At most [`Limits::max_connections`] connections are served at
//! once (the next gets an error line and is closed), each is closed after
//! [`Limits::idle_timeout`] without a request and when a response cannot be written
//! within [`Limits::write_timeout`], and peers other than root or the daemon's user
//! (`SO_PEERCRED`) are refused.

use std::io::{self, BufRead, BufReader, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use serde_json::{json, Value};

use crate::api::{Progress, Request, Response};
use crate::error::Error;

/// Longest request line accepted.
pub const MAX_LINE: usize = 64 << 10;

/// What the daemon does with requests; `progress` receives intermediate lines.
pub trait Handler: Send + Sync {
    /// Serves one request; returns the final answer (without "ok"). An error's message
    /// is sent to the client.
    fn handle(&self, req: Request, progress: &mut dyn FnMut(Progress)) -> Result<Response, Error>;
}

/// Why the control socket cannot be created.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// Its directory cannot be created or examined.
    #[error("control socket directory {}: {source}", path.display())]
    Dir {
        /// The directory.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// Its directory would let another user replace the socket.
    #[error("control socket directory {}: {problem}", path.display())]
    UnsafeDir {
        /// The directory.
        path: PathBuf,
        /// What is wrong with it.
        problem: UnsafeDir,
    },
    /// A daemon answers on it already.
    #[error("{}: another lc daemon is listening there", path.display())]
    InUse {
        /// The socket path.
        path: PathBuf,
    },
    /// Something else than a socket has its name.
    #[error("{}: exists and is not a socket (not replaced)", path.display())]
    NotASocket {
        /// The socket path.
        path: PathBuf,
    },
    /// Creating, binding or renaming failed.
    #[error("{}: {source}", path.display())]
    Socket {
        /// The path being worked on.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
}

/// What makes a socket directory unsafe.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum UnsafeDir {
    /// Not a directory.
    #[error("not a directory")]
    NotADirectory,
    /// Owned by another user than root or the daemon's.
    #[error("owned by uid {0}, not root or the daemon's user")]
    ForeignOwner(u32),
    /// Group- or world-writable without the sticky bit.
    #[error("writable by other users (mode {0:o}) and not sticky")]
    Writable(u32),
}

/// Whether `uid` may use the control socket of a daemon running as `daemon_uid`.
pub fn peer_allowed(uid: u32, daemon_uid: u32) -> bool {
    uid == 0 || uid == daemon_uid
}

fn euid() -> u32 {
    rustix::process::geteuid().as_raw()
}

/// Checks the directory that will hold the socket (after following symlinks).
pub fn check_socket_dir(dir: &Path) -> Result<(), ControlError> {
    let m = std::fs::metadata(dir).map_err(|source| ControlError::Dir {
        path: dir.to_path_buf(),
        source,
    })?;
    let problem = if !m.is_dir() {
        Some(UnsafeDir::NotADirectory)
    } else if !peer_allowed(m.uid(), euid()) {
        Some(UnsafeDir::ForeignOwner(m.uid()))
    } else if m.mode() & 0o022 != 0 && m.mode() & 0o1000 == 0 {
        Some(UnsafeDir::Writable(m.mode() & 0o7777))
    } else {
        None
    };
    match problem {
        Some(problem) => Err(ControlError::UnsafeDir {
            path: dir.to_path_buf(),
            problem,
        }),
        None => Ok(()),
    }
}

/// Limits on control connections.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Connections served at once; the next is answered with an error and closed.
    pub max_connections: usize,
    /// A connection that sends no complete request for this long is closed.
    pub idle_timeout: Duration,
    /// A response (or progress line) that cannot be written for this long closes the
    /// connection.
    pub write_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 16,
            idle_timeout: Duration::from_secs(30),
            write_timeout: Duration::from_secs(10),
        }
    }
}

/// The listening control socket with its limits and the count of open connections.
#[derive(Debug)]
pub struct Listener {
    inner: UnixListener,
    limits: Limits,
    open: Arc<AtomicUsize>,
}

impl AsRawFd for Listener {
    fn as_raw_fd(&self) -> RawFd {
        self.inner.as_raw_fd()
    }
}

impl Listener {
    /// Connections being served now.
    pub fn open_connections(&self) -> usize {
        self.open.load(Ordering::SeqCst)
    }
}

/// Creates the socket with the default [`Limits`].
pub fn listen(path: &Path) -> Result<Listener, ControlError> {
    listen_with(path, Limits::default())
}

/// Creates the socket, mode 0600 from the moment it has its name: a stale socket is
/// replaced, a live one refused, anything else left alone; a missing directory is
/// created 0700, an existing one must pass [`check_socket_dir`].
pub fn listen_with(path: &Path, limits: Limits) -> Result<Listener, ControlError> {
    let sock_err = |p: &Path| {
        let p = p.to_path_buf();
        move |source| ControlError::Socket { path: p, source }
    };
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(|source| ControlError::Dir {
                path: dir.clone(),
                source,
            })?;
    }
    check_socket_dir(&dir)?;
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            if UnixStream::connect(path).is_ok() {
                return Err(ControlError::InUse {
                    path: path.to_path_buf(),
                });
            }
        }
        Ok(_) => {
            return Err(ControlError::NotASocket {
                path: path.to_path_buf(),
            })
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(sock_err(path)(e)),
    }
    // A private directory beside the socket: nobody else can reach what is in it.
    let mut private = None;
    for n in 0..100 {
        let p = dir.join(format!(".lc.{}.{n}", std::process::id()));
        match std::fs::DirBuilder::new().mode(0o700).create(&p) {
            Ok(()) => {
                private = Some(p);
                break;
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(sock_err(&p)(e)),
        }
    }
    let private = private.ok_or_else(|| {
        sock_err(&dir)(io::Error::new(
            io::ErrorKind::AlreadyExists,
            "no free private directory name",
        ))
    })?;
    let tmp = private.join("s");
    let made = UnixListener::bind(&tmp)
        .map_err(sock_err(&tmp))
        .and_then(|l| {
            std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))
                .map_err(sock_err(&tmp))?;
            std::fs::rename(&tmp, path).map_err(sock_err(path))?;
            l.set_nonblocking(true).map_err(sock_err(path))?;
            Ok(l)
        });
    let _ = std::fs::remove_file(&tmp);
    let _ = std::fs::remove_dir(&private);
    Ok(Listener {
        inner: made?,
        limits,
        open: Arc::new(AtomicUsize::new(0)),
    })
}

/// Decrements the open-connection count when a serving thread ends.
struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Answers a connection that is not served with one error line and closes it, without
/// ever blocking the caller (the event loop).
fn refuse(mut s: UnixStream, why: &str) {
    let _ = s.set_nonblocking(true);
    let _ = write_line(&mut s, &json!({"ok": false, "error": why}));
}

/// Accepts every pending connection and serves each on its own thread, within the
/// listener's limits.
pub fn accept_all(l: &Listener, handler: &Arc<dyn Handler>) {
    while let Ok((s, _)) = l.inner.accept() {
        match rustix::net::sockopt::socket_peercred(&s) {
            Ok(c) if peer_allowed(c.uid.as_raw(), euid()) => {}
            Ok(c) => {
                refuse(
                    s,
                    &format!(
                        "uid {} may not use the control socket (root only)",
                        c.uid.as_raw()
                    ),
                );
                continue;
            }
            Err(e) => {
                refuse(s, &format!("cannot identify the peer: {e}"));
                continue;
            }
        }
        let max = l.limits.max_connections;
        if l.open.fetch_add(1, Ordering::SeqCst) >= max {
            l.open.fetch_sub(1, Ordering::SeqCst);
            refuse(
                s,
                &format!("too many control connections ({max} open); try again later"),
            );
            continue;
        }
        let slot = Slot(l.open.clone());
        let h = handler.clone();
        let limits = l.limits;
        // On a spawn failure the closure, and the slot with it, is dropped.
        let _ = std::thread::Builder::new()
            .name("lc-control".into())
            .spawn(move || {
                let _slot = slot;
                serve_conn(s, h.as_ref(), limits)
            });
    }
}

/// Ends a connection the daemon gives up on so that the client reads the last line and
/// then end-of-file: the write side is shut, and what the client sent meanwhile is read
/// and dropped (closing a Unix socket with unread data makes the peer's reads fail with
/// ECONNRESET, losing the line).
fn close_gently(r: &mut BufReader<UnixStream>, w: &UnixStream) {
    let _ = w.shutdown(std::net::Shutdown::Write);
    let _ = r
        .get_ref()
        .set_read_timeout(Some(Duration::from_millis(100)));
    let mut sink = [0u8; 4096];
    for _ in 0..256 {
        match io::Read::read(r, &mut sink) {
            Ok(n) if n > 0 => continue,
            _ => break,
        }
    }
}

fn write_line(s: &mut UnixStream, v: &Value) -> io::Result<()> {
    let mut t = v.to_string();
    t.push('\n');
    s.write_all(t.as_bytes())
}

/// Serves one connection until it closes, goes idle for `limits.idle_timeout` or
/// cannot be written to for `limits.write_timeout`: one response (plus progress
/// lines) per line.
pub fn serve_conn(s: UnixStream, handler: &dyn Handler, limits: Limits) {
    let _ = s.set_nonblocking(false);
    if s.set_read_timeout(Some(limits.idle_timeout)).is_err()
        || s.set_write_timeout(Some(limits.write_timeout)).is_err()
    {
        return;
    }
    let Ok(mut w) = s.try_clone() else { return };
    let mut r = BufReader::new(s);
    loop {
        let mut line = String::new();
        match io::Read::take(&mut r, MAX_LINE as u64 + 1).read_line(&mut line) {
            Ok(0) => return,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                let _ = write_line(
                    &mut w,
                    &json!({"ok": false, "error": format!(
                        "no request for {} s: closing the connection",
                        limits.idle_timeout.as_secs_f64()
                    )}),
                );
                close_gently(&mut r, &w);
                return;
            }
            Err(_) => return,
            Ok(n) if n > MAX_LINE => {
                let _ = write_line(
                    &mut w,
                    &json!({"ok": false, "error": format!("request longer than {MAX_LINE} bytes")}),
                );
                close_gently(&mut r, &w);
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
                // After one progress line fails (the client stopped reading), the
                // request runs to its end without waiting on the client again.
                let mut stuck = false;
                let mut progress = |p: Progress| {
                    if !stuck && write_line(&mut w2, &json!({ "progress": p })).is_err() {
                        stuck = true;
                    }
                };
                let resp = match handler
                    .handle(req, &mut progress)
                    .map(|r| serde_json::to_value(r).map_err(Error::Encode))
                {
                    Ok(Ok(Value::Object(mut m))) => {
                        m.insert("ok".into(), Value::Bool(true));
                        Value::Object(m)
                    }
                    Ok(Ok(other)) => json!({"ok": true, "result": other}),
                    Ok(Err(e)) | Err(e) => json!({"ok": false, "error": e.to_string()}),
                };
                if stuck {
                    return;
                }
                resp
            }
        };
        if write_line(&mut w, &resp).is_err() {
            return;
        }
    }
}

/// Sends a request and returns the final response line as sent (with `"ok": true`);
/// progress lines go to `progress`. A refusal is [`Error::Refused`] with the daemon's
/// message.
pub fn request(
    path: &Path,
    req: &Request,
    progress: &mut dyn FnMut(Progress),
) -> Result<Value, Error> {
    let mut s = UnixStream::connect(path).map_err(|source| Error::Connect {
        path: path.to_path_buf(),
        source,
    })?;
    s.set_read_timeout(Some(Duration::from_secs(24 * 3600)))
        .ok();
    let mut line = serde_json::to_string(req).map_err(Error::Encode)?;
    line.push('\n');
    // A daemon that refuses the connection (too many open) answers with one error
    // line and closes, maybe before the request is written: read that line even when
    // writing failed.
    let sent = s.write_all(line.as_bytes());
    let mut r = BufReader::new(s);
    loop {
        let mut l = String::new();
        match (r.read_line(&mut l), sent.is_ok()) {
            (Ok(0), true) => return Err(Error::Closed),
            (Ok(0) | Err(_), false) => return Err(Error::Io(sent.unwrap_err())),
            (Err(e), true) => return Err(Error::Io(e)),
            (Ok(_), _) => {}
        }
        let v: Value = serde_json::from_str(&l).map_err(|source| Error::BadResponse {
            line: l.clone(),
            source,
        })?;
        if let Some(p) = v.get("progress") {
            if let Ok(p) = Progress::deserialize(p) {
                progress(p);
            }
            continue;
        }
        return if v["ok"] == Value::Bool(true) {
            Ok(v)
        } else {
            Err(Error::Refused(
                v["error"].as_str().unwrap_or("unknown error").to_string(),
            ))
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{Done, Drained, Status};

    struct Echo;
    impl Handler for Echo {
        fn handle(
            &self,
            req: Request,
            progress: &mut dyn FnMut(Progress),
        ) -> Result<Response, Error> {
            match req {
                Request::Drain { lun } => {
                    for i in (0..3).rev() {
                        progress(Progress {
                            remaining: i,
                            total: 3,
                        });
                    }
                    Ok(Response::Drained(Drained {
                        lun,
                        dirty_lines: 0,
                    }))
                }
                Request::Set { cache, key, .. } if key == "bad" => Err(Error::NoCache {
                    cache,
                    known: vec![],
                }),
                Request::Status => Ok(Response::Status(Status::default())),
                _ => Ok(Response::Done(Done {})),
            }
        }
    }

    fn server() -> (tempfile::TempDir, PathBuf) {
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
        assert_eq!(v.to_string(), r#"{"caches":[],"luns":[],"ok":true}"#);
        let v = request(&p, &Request::Reload, &mut |_| {}).unwrap();
        assert_eq!(v.to_string(), r#"{"ok":true}"#);
        let mut seen = Vec::new();
        let v = request(
            &p,
            &Request::Drain {
                lun: "disk0".into(),
            },
            &mut |p| seen.push(p.remaining),
        )
        .unwrap();
        assert_eq!(
            v.to_string(),
            r#"{"dirty_lines":0,"lun":"disk0","ok":true}"#
        );
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
        assert!(
            matches!(&e, Error::Refused(m) if m == r#"no cache "c" (known: [])"#),
            "{e}"
        );
        assert!(matches!(listen(&p), Err(ControlError::InUse { .. })));
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
        let mut long = vec![b'x'; MAX_LINE + 10];
        long.push(b'\n');
        s.write_all(&long).unwrap();
        let mut l = String::new();
        r.read_line(&mut l).unwrap();
        assert!(l.contains("longer than"));
    }

    #[test]
    fn the_socket_never_has_its_name_with_another_mode_than_0600() {
        use rustix::fs::inotify::{self, CreateFlags, ReadFlags, WatchFlags};
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("control.sock");
        let ino = inotify::init(CreateFlags::NONBLOCK | CreateFlags::CLOEXEC).unwrap();
        inotify::add_watch(&ino, dir.path(), WatchFlags::ALL_EVENTS).unwrap();
        // A watcher stats the name as fast as it can while sockets are created.
        let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let watcher = {
            let (p, done) = (p.clone(), done.clone());
            std::thread::spawn(move || {
                let mut seen = std::collections::BTreeSet::new();
                while !done.load(Ordering::SeqCst) {
                    if let Ok(m) = std::fs::symlink_metadata(&p) {
                        seen.insert(m.mode() & 0o7777);
                    }
                }
                seen
            })
        };
        for _ in 0..200 {
            let l = listen(&p).unwrap();
            assert_eq!(std::fs::metadata(&p).unwrap().mode() & 0o7777, 0o600);
            drop(l);
            std::fs::remove_file(&p).unwrap();
        }
        done.store(true, Ordering::SeqCst);
        let modes = watcher.join().unwrap();
        assert!(
            modes.iter().all(|&m| m == 0o600),
            "modes seen under the name: {:?}",
            modes.iter().map(|m| format!("{m:o}")).collect::<Vec<_>>()
        );
        // The name appears only by a rename of a socket already 0600; it is never
        // created or chmod-ed in place (what a window would need).
        let mut buf = [std::mem::MaybeUninit::uninit(); 1 << 16];
        let mut r = inotify::Reader::new(&ino, &mut buf);
        let mut on_name = ReadFlags::empty();
        loop {
            match r.next() {
                Ok(ev) => {
                    if ev
                        .file_name()
                        .is_some_and(|n| n.to_bytes() == b"control.sock")
                    {
                        on_name |= ev.events();
                    }
                }
                Err(rustix::io::Errno::AGAIN) => break,
                Err(e) => panic!("inotify: {e}"),
            }
        }
        assert!(on_name.contains(ReadFlags::MOVED_TO), "{on_name:?}");
        assert!(
            !on_name.intersects(ReadFlags::CREATE | ReadFlags::ATTRIB),
            "{on_name:?}"
        );
        // No private directory is left behind.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn unsafe_directories_and_foreign_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let open = dir.path().join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
        assert!(matches!(
            listen(&open.join("c.sock")),
            Err(ControlError::UnsafeDir {
                problem: UnsafeDir::Writable(0o777),
                ..
            })
        ));
        // Sticky like /tmp: others cannot replace what is ours.
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o1777)).unwrap();
        listen(&open.join("c.sock")).unwrap();
        if euid() == 0 {
            let foreign = dir.path().join("foreign");
            std::fs::create_dir(&foreign).unwrap();
            std::os::unix::fs::chown(&foreign, Some(65534), Some(65534)).unwrap();
            assert!(matches!(
                listen(&foreign.join("c.sock")),
                Err(ControlError::UnsafeDir {
                    problem: UnsafeDir::ForeignOwner(65534),
                    ..
                })
            ));
        }
        // A missing directory is created 0700.
        let fresh = dir.path().join("a/b");
        listen(&fresh.join("c.sock")).unwrap();
        assert_eq!(std::fs::metadata(&fresh).unwrap().mode() & 0o777, 0o700);
        // A file that is not a socket is not replaced.
        let file = dir.path().join("precious");
        std::fs::write(&file, b"data").unwrap();
        assert!(matches!(
            listen(&file),
            Err(ControlError::NotASocket { .. })
        ));
        assert_eq!(std::fs::read(&file).unwrap(), b"data");
    }

    #[test]
    fn control_md_states_the_default_limits() {
        let doc = include_str!("../docs/CONTROL.md");
        let l = Limits::default();
        for want in [
            format!(
                "At most {} connections are served at once",
                l.max_connections
            ),
            format!("too many control connections ({} open)", l.max_connections),
            format!("no complete request for {} s", l.idle_timeout.as_secs()),
            format!("cannot be written for {} s", l.write_timeout.as_secs()),
        ] {
            assert!(doc.contains(&want), "docs/CONTROL.md lacks {want:?}");
        }
    }

    #[test]
    fn only_root_or_the_daemons_user_may_connect() {
        assert!(peer_allowed(0, 0));
        assert!(peer_allowed(0, 1000));
        assert!(peer_allowed(1000, 1000));
        assert!(!peer_allowed(1000, 0));
        assert!(!peer_allowed(1001, 1000));
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
