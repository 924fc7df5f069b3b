//! The control socket against a daemon's real caches, driven with the `lc` binary as a
//! user would: status, stats, set, flush, commit, drain with progress, bad requests;
//! the cap on connections, the idle and write timeouts, and peers of other users.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use lc::control::{accept_all, listen_with, Handler, Limits, Listener};
use lc::daemon::Shared;

fn lc(socket: &Path, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_lc"))
        .args(args)
        .arg("--socket")
        .arg(socket)
        .output()
        .unwrap()
}

#[test]
fn cli_commands_reach_the_daemon_caches() {
    let d = daemon(Limits::default());
    let (socket, backing, shared) = (
        d.socket.clone(),
        d.dir.path().join("backing.img"),
        &d.shared,
    );
    // Dirty data for disk0.
    let (c, id) = shared.lun_cache("disk0").unwrap();
    let data: Vec<u8> = (0..2 << 20).map(|i: u32| (i % 241) as u8).collect();
    c.write(id, 4096, &data, false).unwrap();

    let out = lc(&socket, &["status"]);
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("disk0") && text.contains("c0"), "{text}");

    let out = lc(&socket, &["status", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["luns"][0]["backing_id"], 3);
    assert!(v["luns"][0]["dirty_lines"].as_u64().unwrap() >= 512);

    assert!(lc(&socket, &["set", "c0", "writeback_threshold", "5"])
        .status
        .success());
    let out = lc(&socket, &["set", "c0", "writeback_threshold", "500"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("out of range"));
    let out = lc(&socket, &["set", "nope", "writeback_threshold", "5"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("no cache"));
    assert!(lc(&socket, &["flush", "c0"]).status.success());
    assert!(lc(&socket, &["commit", "c0"]).status.success());

    let out = lc(&socket, &["stats", "c0", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["stats"]["c0"]["tunables"]["writeback_threshold"], "5");
    assert!(
        v["stats"]["c0"]["counters"]["write_miss_disk_full"]
            .as_u64()
            .unwrap()
            >= 512
    );

    // Prometheus text (textfile collector): per cache and per LUN, with a hit ratio.
    let mut b = vec![0u8; 4096];
    c.read(id, 4096, &mut b).unwrap();
    let out = lc(&socket, &["stats", "--prometheus"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(
        text.contains("# TYPE lc_line_accesses_total counter"),
        "{text}"
    );
    assert!(
        text.contains(r#"lc_line_accesses_total{cache="c0",lun="disk0",op="write",result="miss",where="disk",size="full"} 512"#),
        "{text}"
    );
    assert!(
        text.contains(r#"lc_hit_ratio{cache="c0",lun="disk0",op="read"} 1.0000"#),
        "{text}"
    );
    assert!(
        text.contains(r#"lc_dirty_lines{cache="c0",lun="disk0"} 512"#),
        "{text}"
    );
    assert!(
        text.contains(r#"lc_writeback_failing{cache="c0",lun="disk0"} 0"#),
        "{text}"
    );
    assert!(text.contains(r#"lc_failed{cache="c0"} 0"#), "{text}");
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let (_, value) = line.rsplit_once(' ').unwrap();
        assert!(value.parse::<f64>().is_ok(), "not a sample: {line}");
    }

    let out = lc(&socket, &["drain", "disk0"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let raw = std::fs::read(&backing).unwrap();
    assert!(
        raw[4096..4096 + data.len()] == data[..],
        "backing holds the data after drain"
    );
    let v: serde_json::Value =
        serde_json::from_slice(&lc(&socket, &["status", "--json"]).stdout).unwrap();
    assert_eq!(v["luns"][0]["dirty_lines"], 0);

    let out = lc(&socket, &["drain", "nope"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("no lun"));
    let out = Command::new(env!("CARGO_BIN_EXE_lc"))
        .args(["status", "--socket", "/nonexistent/sock"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("is `lc serve` running"));
}

/// A cache whose log was damaged in the middle (a flipped byte in three lines of a
/// durable segment): `lc check` says which data is lost (those lines, not the rest of
/// their segment) and exits 1, the daemon serves it with the loss
/// visible in `lc status` / `lc stats`, reads of the lost data fail, and `lc
/// accept-loss` names what was lost and lets the older data be read again.
#[test]
fn damaged_log_is_reported_and_accept_loss_releases_it() {
    use lc_cache::{Backing, BlockDevice, Cache, FileDevice, OpenOptions, Tunables};
    let files = images();
    let (cache, backing) = (files.cache.clone(), files.backing.clone());
    // Two rounds over 40 blocks, each made durable; the cache closes cleanly.
    let round_a_end = {
        let cdev: Arc<dyn BlockDevice> = Arc::new(FileDevice::open(&cache, false).unwrap());
        let bdev: Arc<dyn BlockDevice> = Arc::new(FileDevice::open(&backing, false).unwrap());
        let (c, _) = Cache::open(
            cdev,
            vec![Backing {
                id: 3,
                dev: bdev,
                label: "disk0".into(),
            }],
            OpenOptions {
                tunables: Tunables {
                    writeback_enabled: false,
                    // No checkpoint: recovery walks (and checks) the whole log, so
                    // the flip below is found.
                    checkpoint_interval_segments: 0,
                    ..Tunables::default()
                },
                ..Default::default()
            },
        )
        .unwrap();
        let mut a = 0;
        for round in [1u8, 2] {
            for b in 0..40u64 {
                c.write(3, b * 4096, &[round; 4096], false).unwrap();
            }
            c.flush().unwrap();
            if round == 1 {
                // Round A ends in this segment (appended to, still open): round B's
                // lines fill it, then the next segments.
                a = c.stats().open_segment_id;
            }
        }
        assert_eq!(c.geometry().lines_per_segment, 14);
        c.close().unwrap();
        a
    };
    // Flip a data byte in lines 5, 6 and 7 of round B's first whole segment (segment
    // id a+1, slot a; after two header copies of one block each): blocks 7, 8 and 9.
    let mut img = std::fs::read(&cache).unwrap();
    for line in 5..8 {
        let off = (64 << 10) * (1 + round_a_end as usize) + 2 * 4096 + line * 4096 + 17;
        img[off] ^= 0x20;
    }
    std::fs::write(&cache, &img).unwrap();

    let out = Command::new(env!("CARGO_BIN_EXE_lc"))
        .arg("check")
        .arg(&cache)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains(&format!("DAMAGE: segment {}", round_a_end + 1)),
        "{text}"
    );
    assert!(
        text.contains("backing 3 (\"disk0\"): 3 lines lost"),
        "{text}"
    );

    let d = serve(files, Limits::default());
    let (socket, shared) = (d.socket.clone(), &d.shared);
    let out = lc(&socket, &["status"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("DAMAGED") && text.contains("lost 3 lines"),
        "{text}"
    );
    let v: serde_json::Value =
        serde_json::from_slice(&lc(&socket, &["status", "--json"]).stdout).unwrap();
    assert_eq!(v["luns"][0]["lost_lines"], 3);
    let v: serde_json::Value =
        serde_json::from_slice(&lc(&socket, &["stats", "c0", "--json"]).stdout).unwrap();
    assert_eq!(
        v["stats"]["c0"]["damage"]["lost_ranges"][0]["sectors"],
        3 * 8
    );
    assert_eq!(v["stats"]["c0"]["damage"]["lost_ranges"][0]["lun"], "disk0");

    let (c, id) = shared.lun_cache("disk0").unwrap();
    let mut buf = vec![0u8; 4096];
    // Round B's blocks 0 and 1 filled round A's last segment; 2..16 are in the damaged
    // one, of which 7..10 are lost.
    assert!(matches!(
        c.read(id, 7 * 4096, &mut buf),
        Err(lc_cache::Error::Lost { .. })
    ));
    for b in [2, 6, 10, 39] {
        c.read(id, b * 4096, &mut buf).unwrap();
        assert!(
            buf.iter().all(|&x| x == 2),
            "intact round B data after the damage (block {b})"
        );
    }

    let out = lc(&socket, &["accept-loss", "c0"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("lost: backing 3 (disk0) sectors 56..+24"),
        "{text}"
    );
    c.read(id, 7 * 4096, &mut buf).unwrap();
    assert!(
        buf.iter().all(|&b| b == 1),
        "round A after the loss was accepted"
    );
}

/// `lc scrub`: every cached line is read and checked while the daemon serves; a line
/// rotten on the cache device, which nobody read, is reported (and lost from then on),
/// and `lc status` shows it; a scrub of a sound cache finds nothing.
#[test]
fn scrub_reports_a_line_rotten_under_the_daemon() {
    let files = images();
    let cache_file = files.cache.clone();
    let d = serve(files, Limits::default());
    let (c, id) = d.shared.lun_cache("disk0").unwrap();
    for b in 0..20u64 {
        c.write(id, b * 4096, &[b as u8 + 1; 4096], false).unwrap();
    }
    c.seal_now().unwrap();
    c.flush().unwrap();
    let out = lc(&d.socket, &["scrub", "c0"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("20 lines in 2 segments checked") && text.contains(", 0 rotten"),
        "{text}"
    );
    // Block 5 is slot 5 of segment 1 (a fresh cache fills it in order).
    let at = c.geometry().line_offset(1, 5) + 1000;
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&cache_file)
            .unwrap();
        let mut b = [0u8; 1];
        f.read_exact_at(&mut b, at).unwrap();
        f.write_all_at(&[b[0] ^ 0x10], at).unwrap();
        f.sync_all().unwrap();
    }
    let v: serde_json::Value =
        serde_json::from_slice(&lc(&d.socket, &["scrub", "c0", "--json"]).stdout).unwrap();
    assert_eq!(
        (v["ok"].as_bool(), v["rotten"].as_u64()),
        (Some(true), Some(1)),
        "{v}"
    );
    assert_eq!(v["damage"]["lost_ranges"][0]["sector"], 5 * 8, "{v}");
    assert_eq!(v["damage"]["lost_ranges"][0]["lun"], "disk0", "{v}");
    let v: serde_json::Value =
        serde_json::from_slice(&lc(&d.socket, &["stats", "c0", "--json"]).stdout).unwrap();
    assert_eq!(v["stats"]["c0"]["rotten_found"], 1, "{v}");
    let text = String::from_utf8_lossy(&lc(&d.socket, &["status"]).stdout).into_owned();
    assert!(
        text.contains("DAMAGED") && text.contains("lost 1 lines"),
        "{text}"
    );
    let mut buf = vec![0u8; 4096];
    assert!(matches!(
        c.read(id, 5 * 4096, &mut buf),
        Err(lc_cache::Error::Lost { .. })
    ));
    c.read(id, 6 * 4096, &mut buf).unwrap();
    assert!(buf.iter().all(|&x| x == 7));
    // The checkpoint thread records the loss: `lc status` says so, and the log goes on
    // past the damaged segment (16 MiB cache: writes of 40 MiB lap it twice).
    let t0 = Instant::now();
    let text = loop {
        let text = String::from_utf8_lossy(&lc(&d.socket, &["status"]).stdout).into_owned();
        if text.contains("(recorded: the log goes on)") {
            break text;
        }
        assert!(t0.elapsed().as_secs() < 20, "never recorded: {text}");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(text.contains("lost 1 lines"), "{text}");
    for i in 0..10_240u64 {
        let b = 20 + i % 1000;
        c.write(id, b * 4096, &[(i % 251) as u8; 4096], false)
            .unwrap_or_else(|e| panic!("write {i}: {e}"));
        if i % 64 == 0 {
            c.flush().unwrap();
        }
    }
    c.flush().unwrap();
    assert!(matches!(
        c.read(id, 5 * 4096, &mut buf),
        Err(lc_cache::Error::Lost { .. })
    ));
    let v: serde_json::Value =
        serde_json::from_slice(&lc(&d.socket, &["stats", "c0", "--json"]).stdout).unwrap();
    // Laps: the segment ids went past twice the ring.
    let st = &v["stats"]["c0"];
    assert!(
        st["open_segment_id"].as_u64().unwrap() > 2 * st["nr_segments"].as_u64().unwrap(),
        "{v}"
    );
    assert_eq!(st["damage"]["recorded"], true, "{v}");
    assert_eq!(
        v["stats"]["c0"]["damage"]["segments"],
        serde_json::json!([]),
        "{v}"
    );
}

/// A formatted 16 MiB cache file (64 KiB segments) and an 8 MiB backing file.
struct Images {
    dir: tempfile::TempDir,
    cache: PathBuf,
    backing: PathBuf,
}

fn images() -> Images {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache.img");
    let backing = dir.path().join("backing.img");
    std::fs::File::create(&cache)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    std::fs::File::create(&backing)
        .unwrap()
        .set_len(8 << 20)
        .unwrap();
    assert!(Command::new(env!("CARGO_BIN_EXE_lc"))
        .args(["format", "-y", "--segment-size", "64KiB"])
        .arg(&cache)
        .status()
        .unwrap()
        .success());
    Images {
        dir,
        cache,
        backing,
    }
}

/// A daemon's caches and control socket (as `lc serve` has them, without TCMU): cache
/// c0 (writeback off) on the images, LUN disk0 with backing id 3.
struct Daemon {
    dir: tempfile::TempDir,
    socket: PathBuf,
    listener: Arc<Listener>,
    shared: Arc<Shared>,
}

fn serve(img: Images, limits: Limits) -> Daemon {
    let Images {
        dir,
        cache,
        backing,
    } = img;
    let socket = dir.path().join("run/control.sock");
    let text = format!(
        "[daemon]\ncontrol_socket = {socket:?}\n[[cache]]\nname = \"c0\"\ndevice = {cache:?}\n[cache.tunables]\nwriteback_enabled = false\n\
         [[lun]]\nname = \"disk0\"\ncache = \"c0\"\nbacking = {backing:?}\nbacking_id = 3\n"
    );
    let cfg = lc::config::parse(&text, Path::new("test.toml")).unwrap();
    let shared = Shared::open(cfg, slog::Logger::root(slog::Discard, slog::o!())).unwrap();
    let listener = Arc::new(listen_with(&socket, limits).unwrap());
    let handler: Arc<dyn Handler> = shared.clone();
    let l = listener.clone();
    std::thread::spawn(move || loop {
        accept_all(&l, &handler);
        std::thread::sleep(Duration::from_millis(5));
    });
    Daemon {
        dir,
        socket,
        listener,
        shared,
    }
}

fn daemon(limits: Limits) -> Daemon {
    serve(images(), limits)
}

fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A client that sent one request and got its answer: it holds a served connection.
fn served_client(socket: &Path) -> UnixStream {
    let mut s = UnixStream::connect(socket).unwrap();
    s.write_all(b"{\"cmd\":\"status\"}\n").unwrap();
    let mut line = String::new();
    BufReader::new(s.try_clone().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(line.contains("\"ok\":true"), "{line}");
    s
}

#[test]
fn connections_beyond_the_cap_are_refused_until_one_closes() {
    let d = daemon(Limits::default());
    let cap = Limits::default().max_connections;
    assert_eq!(cap, 16);
    let mut clients: Vec<UnixStream> = (0..cap).map(|_| served_client(&d.socket)).collect();
    assert_eq!(d.listener.open_connections(), cap);
    let out = lc(&d.socket, &["status"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("too many control connections (16 open)"),
        "{err}"
    );
    assert_eq!(
        d.listener.open_connections(),
        cap,
        "the refused one holds nothing"
    );
    drop(clients.pop());
    wait_for("a freed slot", || d.listener.open_connections() == cap - 1);
    let out = lc(&d.socket, &["status"]);
    assert!(out.status.success(), "{out:?}");
}

#[test]
fn silent_slow_and_non_reading_clients_are_dropped_and_free_their_slot() {
    let limits = Limits {
        max_connections: 1,
        idle_timeout: Duration::from_millis(300),
        write_timeout: Duration::from_millis(300),
    };
    let d = daemon(limits);
    // A client that connects and says nothing holds the only slot, for a while.
    let silent = UnixStream::connect(&d.socket).unwrap();
    wait_for("the silent client to be served", || {
        d.listener.open_connections() == 1
    });
    let out = lc(&d.socket, &["status"]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("too many control connections"),
        "{out:?}"
    );
    let start = Instant::now();
    let mut text = String::new();
    silent
        .try_clone()
        .unwrap()
        .read_to_string(&mut text)
        .unwrap();
    assert!(text.contains("no request for 0.3 s"), "{text}");
    assert!(start.elapsed() < Duration::from_secs(5));
    wait_for("the slot back", || d.listener.open_connections() == 0);
    assert!(lc(&d.socket, &["status"]).status.success());

    // Half a request, then silence: the same.
    let mut slow = UnixStream::connect(&d.socket).unwrap();
    slow.write_all(b"{\"cmd\":").unwrap();
    let mut text = String::new();
    slow.read_to_string(&mut text).unwrap();
    assert!(text.contains("no request for"), "{text}");
    wait_for("the slot back", || d.listener.open_connections() == 0);

    // Requests without ever reading the answers: once the answers fill the socket
    // buffers the daemon cannot write for write_timeout and closes the connection.
    let flood = UnixStream::connect(&d.socket).unwrap();
    flood
        .set_write_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let writer = {
        let mut w = flood.try_clone().unwrap();
        std::thread::spawn(move || {
            let line = b"{\"cmd\":\"status\"}\n".repeat(64);
            let mut sent = 0usize;
            while w.write_all(&line).is_ok() {
                sent += line.len();
            }
            sent
        })
    };
    let sent = writer.join().unwrap();
    assert!(sent > 0);
    wait_for("the slot back", || d.listener.open_connections() == 0);
    drop(flood);
    assert!(lc(&d.socket, &["status"]).status.success());
}

#[test]
fn other_users_cannot_use_the_control_socket() {
    if !rustix::process::geteuid().is_root() {
        eprintln!("not root: calls as another user are not exercised");
        return;
    }
    let d = daemon(Limits::default());
    let as_nobody = || {
        Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(env!("CARGO_BIN_EXE_lc"))
            .args(["status", "--socket"])
            .arg(&d.socket)
            .output()
            .expect("setpriv (util-linux)")
    };
    use std::os::unix::fs::PermissionsExt;
    for p in [
        d.dir.path().to_path_buf(),
        d.socket.parent().unwrap().to_path_buf(),
    ] {
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    // Mode 0600 keeps them out...
    let out = as_nobody();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("Permission denied"), "{err}");
    // ...and with the mode opened by mistake, SO_PEERCRED does.
    std::fs::set_permissions(&d.socket, std::fs::Permissions::from_mode(0o666)).unwrap();
    let out = as_nobody();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("uid 65534 may not use the control socket"),
        "{err}"
    );
    assert!(
        lc(&d.socket, &["status"]).status.success(),
        "root still may"
    );
}

/// `lc reload` (what SIGHUP and `systemctl reload lc` do) re-reads lc.toml: a new LUN on
/// a running cache and a new cache come up and serve, a tunable changes; a bad file is
/// refused with the configuration in force kept; a LUN with dirty data is not removed
/// until it is drained.
#[test]
fn reload_adds_and_removes_luns_and_caches_and_refuses_bad_files() {
    let files = images();
    let dir = files.dir.path().to_path_buf();
    let more = |name: &str, size: u64| {
        let p = dir.join(name);
        std::fs::File::create(&p).unwrap().set_len(size).unwrap();
        p
    };
    let (b1, c1, b2) = (
        more("b1.img", 8 << 20),
        more("c1.img", 16 << 20),
        more("b2.img", 8 << 20),
    );
    assert!(Command::new(env!("CARGO_BIN_EXE_lc"))
        .args(["format", "-y", "--segment-size", "64KiB"])
        .arg(&c1)
        .status()
        .unwrap()
        .success());
    let socket = dir.join("run/control.sock");
    let base = format!(
        "[daemon]\ncontrol_socket = {socket:?}\n[[cache]]\nname = \"c0\"\ndevice = {:?}\n[cache.tunables]\nwriteback_enabled = false\n",
        files.cache
    );
    let disk0 = format!(
        "[[lun]]\nname = \"disk0\"\ncache = \"c0\"\nbacking = {:?}\nbacking_id = 3\n",
        files.backing
    );
    let cfg_path = dir.join("lc.toml");
    std::fs::write(&cfg_path, format!("{base}{disk0}")).unwrap();
    let shared = Shared::open(
        lc::config::load(&cfg_path).unwrap(),
        slog::Logger::root(slog::Discard, slog::o!()),
    )
    .unwrap();
    let listener = Arc::new(listen_with(&socket, Limits::default()).unwrap());
    let handler: Arc<dyn Handler> = shared.clone();
    let l = listener.clone();
    std::thread::spawn(move || loop {
        accept_all(&l, &handler);
        std::thread::sleep(Duration::from_millis(5));
    });
    let (c, id) = shared.lun_cache("disk0").unwrap();
    c.write(id, 0, &[9u8; 8192], false).unwrap();

    // A LUN on the running cache, a new cache with its LUN, a tunable.
    let grown = format!(
        "{}{disk0}[[lun]]\nname = \"disk1\"\ncache = \"c0\"\nbacking = {b1:?}\nbacking_id = 4\n\
         [[cache]]\nname = \"c1\"\ndevice = {c1:?}\n[[lun]]\nname = \"disk2\"\ncache = \"c1\"\nbacking = {b2:?}\nbacking_id = 0\n",
        base.replace("writeback_enabled = false", "writeback_enabled = false\nwriteback_threshold = 33")
    );
    std::fs::write(&cfg_path, &grown).unwrap();
    let out = lc(&socket, &["reload"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    for change in [
        "lun disk1 added",
        "cache c1 opened",
        "cache c0: writeback_threshold = 33",
    ] {
        assert!(text.contains(change), "{change}: {text}");
    }
    let v: serde_json::Value =
        serde_json::from_slice(&lc(&socket, &["status", "--json"]).stdout).unwrap();
    let names: Vec<&str> = v["luns"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["disk0", "disk1", "disk2"]);
    for lun in ["disk1", "disk2"] {
        let (c, id) = shared.lun_cache(lun).unwrap();
        c.write(id, 4096, &[5u8; 4096], true).unwrap();
        let mut b = [0u8; 4096];
        c.read(id, 4096, &mut b).unwrap();
        assert_eq!(b, [5u8; 4096], "{lun} serves");
    }
    // A bad file is refused; what is in force stays.
    std::fs::write(&cfg_path, "[[cache]\nnope").unwrap();
    let out = lc(&socket, &["reload"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("lc.toml"),
        "{out:?}"
    );
    assert!(shared.lun_cache("disk2").is_some());
    // disk0 has dirty lines: removing it is refused until it is drained.
    let without_disk0 = grown.replace(&disk0, "");
    std::fs::write(&cfg_path, &without_disk0).unwrap();
    let out = lc(&socket, &["reload"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("lun disk0") && err.contains("drain"), "{err}");
    assert!(shared.lun_cache("disk0").is_some());
    assert!(lc(&socket, &["drain", "disk0"]).status.success());
    let out = lc(&socket, &["reload"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("lun disk0 removed"),
        "{out:?}"
    );
    assert!(shared.lun_cache("disk0").is_none());
    assert!(
        c.read(id, 0, &mut [0u8; 4096]).is_err(),
        "detached from its cache"
    );
}

/// `[daemon] metrics_listen`: an HTTP scrape of `/metrics` gets the Prometheus text,
/// other paths 404, and beyond the client cap connections are closed.
#[test]
fn metrics_are_served_over_http() {
    use std::io::{Read, Write};
    let d = daemon(Limits::default());
    let (c, id) = d.shared.lun_cache("disk0").unwrap();
    c.write(id, 0, &[1u8; 4096], false).unwrap();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap();
    let handler: Arc<dyn Handler> = d.shared.clone();
    let busy = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    std::thread::spawn(move || loop {
        lc::metrics::accept_all(&listener, &handler, &busy);
        std::thread::sleep(Duration::from_millis(5));
    });
    // The answer, or "" when the connection was refused (over the cap: closed, maybe
    // reset with the request unread).
    let get = |path: &str| {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        let mut out = String::new();
        let _ = write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n")
            .and_then(|_| s.read_to_string(&mut out));
        out
    };
    let r = get("/metrics");
    assert!(r.starts_with("HTTP/1.1 200 OK\r\n"), "{r}");
    assert!(r.contains("Content-Type: text/plain; version=0.0.4"), "{r}");
    assert!(
        r.contains(r#"lc_dirty_lines{cache="c0",lun="disk0"} 1"#),
        "{r}"
    );
    let (head, body) = r.split_once("\r\n\r\n").unwrap();
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("Content-Length: "))
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(len, body.len());
    assert!(get("/").starts_with("HTTP/1.1 404"));
    // Silent clients hold at most the cap; the scrape after them still works once
    // they time out or go away.
    let silent: Vec<_> = (0..lc::metrics::MAX_CLIENTS)
        .map(|_| std::net::TcpStream::connect(addr).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(100));
    let mut extra = std::net::TcpStream::connect(addr).unwrap();
    extra
        .set_read_timeout(Some(Duration::from_secs(3)))
        .unwrap();
    let mut b = [0u8; 16];
    assert_eq!(extra.read(&mut b).unwrap_or(0), 0, "over the cap: closed");
    drop(silent);
    wait_for("a free slot", || {
        get("/metrics").starts_with("HTTP/1.1 200")
    });
}
