//! The `lc` command line, run as a user would: format and check on files.

use std::io::Write;
use std::process::{Command, Stdio};

fn lc() -> Command {
    Command::new(env!("CARGO_BIN_EXE_lc"))
}

fn image(dir: &std::path::Path, name: &str, size: u64) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::File::create(&p).unwrap().set_len(size).unwrap();
    p
}

#[test]
fn format_then_check_reports_an_intact_empty_cache() {
    let dir = tempfile::tempdir().unwrap();
    let dev = image(dir.path(), "cache.img", 64 << 20);
    let out = lc()
        .args(["format", "--yes", "--segment-size", "256KiB"])
        .arg(&dev)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("253 segments of 256.0 KiB"), "{text}");

    let out = lc().arg("check").arg(&dev).output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("log intact") && text.contains("0 dirty lines"),
        "{text}"
    );

    let out = lc().args(["check", "--json"]).arg(&dev).output().unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["segment_size"], 256 << 10);
    assert_eq!(v["damage"], serde_json::Value::Null);
}

#[test]
fn format_refuses_an_lc_device_without_force_and_asks_for_confirmation() {
    let dir = tempfile::tempdir().unwrap();
    let dev = image(dir.path(), "cache.img", 16 << 20);
    assert!(lc()
        .args(["format", "-y"])
        .arg(&dev)
        .status()
        .unwrap()
        .success());
    let out = lc().args(["format", "-y"]).arg(&dev).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("already holds an lc cache"));

    // Without --yes, anything but "yes" leaves the device alone.
    let mut child = lc()
        .args(["format", "--force", "--block-size", "4096"])
        .arg(&dev)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(b"no\n").unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not confirmed"));
    let v: serde_json::Value = serde_json::from_slice(
        &lc()
            .args(["check", "--json"])
            .arg(&dev)
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    assert_eq!(v["block_size"], 512, "declined format must not write");

    // A device a daemon holds (here: this process, the same exclusive open) is never
    // formatted, even with --force.
    let held = lc_cache::FileDevice::open_exclusive(&dev, false).unwrap();
    let out = lc()
        .args(["format", "-y", "--force"])
        .arg(&dev)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("in use"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    drop(held);
    assert!(lc()
        .args(["format", "-y", "--force"])
        .arg(&dev)
        .status()
        .unwrap()
        .success());
}

#[test]
fn bad_arguments_and_foreign_devices_get_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let dev = image(dir.path(), "cache.img", 16 << 20);
    let out = lc()
        .args(["format", "-y", "--segment-size", "3MiB"])
        .arg(&dev)
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("power of two"),
        "{out:?}"
    );
    let out = lc()
        .args(["format", "-y", "--block-size", "1024"])
        .arg(&dev)
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("512 or 4096"),
        "{out:?}"
    );
    let out = lc().arg("check").arg(&dev).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not an lc cache"),
        "{out:?}"
    );
    let out = lc()
        .arg("check")
        .arg(dir.path().join("missing"))
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("cannot open"),
        "{out:?}"
    );
}

#[test]
fn serve_refuses_one_device_configured_twice_at_once_naming_both_keys() {
    let dir = tempfile::tempdir().unwrap();
    let cache = image(dir.path(), "cache.img", 16 << 20);
    let backing = image(dir.path(), "hdd.img", 8 << 20);
    let link = dir.path().join("hdd-link");
    std::os::unix::fs::symlink(&backing, &link).unwrap();
    let socket = dir.path().join("control.sock");
    let write_config = |name: &str, second: &std::path::Path| {
        let p = dir.path().join(name);
        std::fs::write(
            &p,
            format!(
                "[daemon]\ncontrol_socket = {socket:?}\ndbus = false\n\
                 [[cache]]\nname = \"c0\"\ndevice = {cache:?}\n\
                 [[lun]]\nname = \"disk0\"\ncache = \"c0\"\nbacking = {backing:?}\nbacking_id = 0\n\
                 [[lun]]\nname = \"disk1\"\ncache = \"c0\"\nbacking = {second:?}\nbacking_id = 1\n"
            ),
        )
        .unwrap();
        p
    };
    for (config, want) in [
        (write_config("two-luns.toml", &link), "lun disk1: backing"),
        (
            write_config("cache-as-backing.toml", &cache),
            "cache c0: device",
        ),
    ] {
        let start = std::time::Instant::now();
        let out = lc()
            .arg("serve")
            .arg("--config")
            .arg(&config)
            .output()
            .unwrap();
        let took = start.elapsed();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert!(
            err.contains("lun disk1: backing (")
                && err.contains(want)
                && err.contains("is the same device as"),
            "{err}"
        );
        assert!(
            took < std::time::Duration::from_secs(5),
            "refused only after {took:?} (the in-use wait is 20 s)"
        );
        assert!(!socket.exists(), "nothing was started");
    }
}

/// Under systemd (stderr is the journal stream `JOURNAL_STREAM` names) every log line
/// starts with its syslog priority and has no timestamp of its own; elsewhere lines
/// keep their timestamp. A log level that does not exist is refused.
#[test]
fn serve_logs_with_journal_priorities_under_systemd() {
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().unwrap();
    let cache = image(dir.path(), "cache.img", 16 << 20);
    let backing = image(dir.path(), "backing.img", 8 << 20);
    assert!(lc()
        .args(["format", "-y", "--segment-size", "64KiB"])
        .arg(&cache)
        .status()
        .unwrap()
        .success());
    let cfg = dir.path().join("lc.toml");
    let socket = dir.path().join("run/control.sock");
    std::fs::write(
        &cfg,
        format!(
            "[daemon]\ncontrol_socket = {socket:?}\ndbus = false\n[[cache]]\nname = \"c0\"\ndevice = {cache:?}\n\
             [[lun]]\nname = \"disk0\"\ncache = \"c0\"\nbacking = {backing:?}\nbacking_id = 0\n"
        ),
    )
    .unwrap();
    let run = |journal: bool| {
        let log = dir.path().join(format!("stderr-{journal}.log"));
        let f = std::fs::File::create(&log).unwrap();
        let meta = f.metadata().unwrap();
        let mut cmd = lc();
        cmd.args(["serve", "--log-level", "info", "--config"])
            .arg(&cfg)
            .stdout(Stdio::null())
            .stderr(Stdio::from(f));
        if journal {
            cmd.env("JOURNAL_STREAM", format!("{}:{}", meta.dev(), meta.ino()));
        } else {
            cmd.env_remove("JOURNAL_STREAM");
        }
        // Without LIO (this machine) serve stops at the kernel's netlink family; with
        // LIO it would serve: stop it after the caches opened either way.
        let mut child = cmd.spawn().unwrap();
        let t0 = std::time::Instant::now();
        while child.try_wait().unwrap().is_none() && t0.elapsed().as_secs() < 10 {
            if std::fs::read_to_string(&log)
                .unwrap()
                .contains("cache opened")
            {
                std::thread::sleep(std::time::Duration::from_millis(200));
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
        std::fs::read_to_string(&log).unwrap()
    };
    let text = run(true);
    let line = text
        .lines()
        .find(|l| l.contains("cache opened"))
        .unwrap_or_else(|| panic!("no cache opened line: {text}"));
    assert!(line.starts_with("<6>cache opened"), "{line}");
    let text = run(false);
    let line = text.lines().find(|l| l.contains("cache opened")).unwrap();
    assert!(!line.starts_with('<') && line.contains("INFO"), "{line}");
    let out = lc()
        .args(["serve", "--log-level", "loud", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("loud"),
        "{out:?}"
    );
}

/// `lc format --yes` on a device holding a file system (or another known signature)
/// refuses without `--force`, and writes nothing.
#[test]
fn format_refuses_a_device_with_a_file_system_without_force() {
    let dir = tempfile::tempdir().unwrap();
    let dev = image(dir.path(), "disk.img", 16 << 20);
    let mut raw = std::fs::read(&dev).unwrap();
    raw[1080] = 0x53;
    raw[1081] = 0xef; // the ext4 superblock magic
    std::fs::write(&dev, &raw).unwrap();
    let out = lc().args(["format", "-y"]).arg(&dev).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("ext2/3/4 file system") && err.contains("--force"),
        "{err}"
    );
    assert_eq!(std::fs::read(&dev).unwrap(), raw, "nothing written");
    assert!(lc()
        .args(["format", "-y", "--force"])
        .arg(&dev)
        .status()
        .unwrap()
        .success());
}

/// Shell completions and the two man pages come from the binary itself.
#[test]
fn completions_and_man_pages_are_generated() {
    let out = lc().args(["completions", "bash"]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("complete") && text.contains("accept-loss"),
        "{text}"
    );
    let out = lc().args(["man"]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(".TH lc 8") && text.contains("accept\\-loss"),
        "{text}"
    );
    let out = lc().args(["man", "lc.toml"]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.starts_with(".TH LC.TOML 5") && text.contains(".B writeback_fail_timeout_s"),
        "{text}"
    );
    let out = lc().args(["man", "nope"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
}
