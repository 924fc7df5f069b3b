//! The control socket against a daemon's real caches, driven with the `lc` binary as a
//! user would: status, stats, set, flush, commit, drain with progress, bad requests.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use lc::control::{accept_all, listen, Handler};
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
    let st = Command::new(env!("CARGO_BIN_EXE_lc"))
        .args(["format", "-y", "--segment-size", "64KiB"])
        .arg(&cache)
        .status()
        .unwrap();
    assert!(st.success());
    let socket = dir.path().join("control.sock");
    let text = format!(
        "[daemon]\ncontrol_socket = {socket:?}\n[[cache]]\nname = \"c0\"\ndevice = {cache:?}\n[cache.tunables]\nwriteback_enabled = false\n\
         [[lun]]\nname = \"disk0\"\ncache = \"c0\"\nbacking = {backing:?}\nbacking_id = 3\n"
    );
    let cfg = lc::config::parse(&text, Path::new("test.toml")).unwrap();
    let shared = Shared::open(cfg, slog::Logger::root(slog::Discard, slog::o!())).unwrap();
    let listener = listen(&socket).unwrap();
    let handler: Arc<dyn Handler> = shared.clone();
    std::thread::spawn(move || loop {
        accept_all(&listener, &handler);
        std::thread::sleep(Duration::from_millis(5));
    });

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

/// A cache whose log was damaged in the middle (one flipped byte in a durable segment):
/// `lc check` says which data is lost and exits 1, the daemon serves it with the loss
/// visible in `lc status` / `lc stats`, reads of the lost data fail, and `lc
/// accept-loss` names what was lost and lets the older data be read again.
#[test]
fn damaged_log_is_reported_and_accept_loss_releases_it() {
    use lc_cache::{Backing, BlockDevice, Cache, FileDevice, OpenOptions, Tunables};
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
                    ..Tunables::default()
                },
                ..Default::default()
            },
        )
        .unwrap();
        for round in [1u8, 2] {
            for b in 0..40u64 {
                c.write(3, b * 4096, &[round; 4096], false).unwrap();
            }
            c.flush().unwrap();
        }
        let a = c.stats().last_flushed_id - 3; // 40 lines = 3 segments of 15 per round
        c.close().unwrap();
        a
    };
    // Flip one data byte in round B's first segment (segment id a+1, slot a).
    let mut img = std::fs::read(&cache).unwrap();
    let off = (64 << 10) * (1 + round_a_end as usize) + 4096 + 5 * 4096 + 17;
    img[off] ^= 0x20;
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
        text.contains("backing 3 (\"disk0\"): 15 lines lost"),
        "{text}"
    );

    let socket = dir.path().join("control.sock");
    let text = format!(
        "[daemon]\ncontrol_socket = {socket:?}\n[[cache]]\nname = \"c0\"\ndevice = {cache:?}\n[cache.tunables]\nwriteback_enabled = false\n\
         [[lun]]\nname = \"disk0\"\ncache = \"c0\"\nbacking = {backing:?}\nbacking_id = 3\n"
    );
    let cfg = lc::config::parse(&text, Path::new("test.toml")).unwrap();
    let shared = Shared::open(cfg, slog::Logger::root(slog::Discard, slog::o!())).unwrap();
    let listener = listen(&socket).unwrap();
    let handler: Arc<dyn Handler> = shared.clone();
    std::thread::spawn(move || loop {
        accept_all(&listener, &handler);
        std::thread::sleep(Duration::from_millis(5));
    });
    let out = lc(&socket, &["status"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("DAMAGED") && text.contains("lost 15 lines"),
        "{text}"
    );
    let v: serde_json::Value =
        serde_json::from_slice(&lc(&socket, &["status", "--json"]).stdout).unwrap();
    assert_eq!(v["luns"][0]["lost_lines"], 15);
    let v: serde_json::Value =
        serde_json::from_slice(&lc(&socket, &["stats", "c0", "--json"]).stdout).unwrap();
    assert_eq!(
        v["stats"]["c0"]["damage"]["lost_ranges"][0]["sectors"],
        15 * 8
    );
    assert_eq!(v["stats"]["c0"]["damage"]["lost_ranges"][0]["lun"], "disk0");

    let (c, id) = shared.lun_cache("disk0").unwrap();
    let mut buf = vec![0u8; 4096];
    assert!(matches!(
        c.read(id, 0, &mut buf),
        Err(lc_cache::Error::Lost { .. })
    ));
    c.read(id, 39 * 4096, &mut buf).unwrap();
    assert!(
        buf.iter().all(|&b| b == 2),
        "intact round B data after the damage"
    );

    let out = lc(&socket, &["accept-loss", "c0"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("lost: backing 3 (disk0) sectors 0..+120"),
        "{text}"
    );
    c.read(id, 0, &mut buf).unwrap();
    assert!(
        buf.iter().all(|&b| b == 1),
        "round A after the loss was accepted"
    );
}
