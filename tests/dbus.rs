//! The D-Bus service on a private bus (Debian package `dbus`): what targetcli reads
//! (ObjectManager.GetManagedObjects with exactly the lc object and its ConfigDesc) and
//! calls (CheckConfig), the refusal when the name is already owned, CheckConfig for
//! root only (the shipped policy on a bus configured like the system bus, and the
//! daemon's own check behind a permissive policy), and a CheckConfig that writes
//! nothing.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};

use lc::dbus::{Bus, DbusService, BUS_NAME, HANDLER_PATH, MANAGER_PATH};

struct PrivateBus {
    child: Child,
    address: String,
    _dir: tempfile::TempDir,
    _config_dir: Option<tempfile::TempDir>,
}

impl Drop for PrivateBus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn private_bus() -> Option<PrivateBus> {
    start_bus(&["--session"])
}

/// A private `dbus-daemon`, or `None` (the test is skipped, saying so) on a machine
/// without one. Under CI (`CI` set) a missing dbus-daemon is a failure: `.ci/run`
/// installs it.
fn start_bus(args: &[&str]) -> Option<PrivateBus> {
    let dir = tempfile::tempdir().unwrap();
    let spawned = Command::new("dbus-daemon")
        .args(args)
        .args(["--nofork", "--print-address=1"])
        .arg(format!(
            "--address=unix:path={}",
            dir.path().join("bus").display()
        ))
        .stdout(Stdio::piped())
        .spawn();
    let mut child = match spawned {
        Ok(c) => c,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && std::env::var_os("CI").is_none() => {
            eprintln!("skipped: no dbus-daemon on this machine (Debian package `dbus`)");
            return None;
        }
        Err(e) => {
            panic!("cannot start dbus-daemon ({e}): install Debian's `dbus` package (.ci/run does)")
        }
    };
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    Some(PrivateBus {
        child,
        address: line.trim().to_string(),
        _dir: dir,
        _config_dir: None,
    })
}

/// A private bus whose rules are those of Debian's system bus that matter here (every
/// user may connect, method calls are denied unless a policy allows them) plus `policy`.
fn system_like_bus(policy: &str) -> Option<PrivateBus> {
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let conf = dir.path().join("bus.conf");
    let listen = dir.path().join("bus").display().to_string();
    std::fs::write(
        &conf,
        format!(
            r#"<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-BUS Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <listen>unix:path={listen}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <deny own="*"/>
    <deny send_type="method_call"/>
    <allow send_type="signal"/>
    <allow send_requested_reply="true" send_type="method_return"/>
    <allow send_requested_reply="true" send_type="error"/>
    <allow receive_type="method_call"/>
    <allow receive_type="method_return"/>
    <allow receive_type="error"/>
    <allow receive_type="signal"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus.Introspectable"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus.Properties"/>
  </policy>
  {policy}
</busconfig>
"#
        ),
    )
    .unwrap();
    let mut bus = start_bus(&[&format!("--config-file={}", conf.display())])?;
    std::fs::set_permissions(
        bus._dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    bus._config_dir = Some(dir);
    Some(bus)
}

const NOBODY: &str = "65534";

/// Runs `dbus-send` as uid 65534 (needs root; None otherwise): (success, stdout+stderr).
fn send_as_nobody(address: &str, iface_member: &str, args: &[&str]) -> Option<(bool, String)> {
    if !rustix::process::geteuid().is_root() {
        eprintln!("not root: the calls as another user are not exercised");
        return None;
    }
    let out = Command::new("setpriv")
        .args([
            &format!("--reuid={NOBODY}"),
            &format!("--regid={NOBODY}"),
            "--clear-groups",
            "dbus-send",
            &format!("--bus={address}"),
            "--print-reply",
            &format!("--dest={BUS_NAME}"),
        ])
        .arg(if iface_member.contains("ObjectManager") {
            MANAGER_PATH
        } else {
            HANDLER_PATH
        })
        .arg(iface_member)
        .args(args)
        .output()
        .expect("setpriv (util-linux) and dbus-send (dbus)");
    Some((
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    ))
}

fn check_config(conn: &zbus::blocking::Connection, arg: &str) -> zbus::Result<(bool, String)> {
    conn.call_method(
        Some(BUS_NAME),
        HANDLER_PATH,
        Some("org.kernel.TCMUService1"),
        "CheckConfig",
        &(arg,),
    )?
    .body()
    .deserialize()
}

fn connect(address: &str) -> zbus::blocking::Connection {
    zbus::blocking::connection::Builder::address(address)
        .unwrap()
        .build()
        .unwrap()
}

#[test]
fn targetcli_sees_user_lc_and_check_config_answers() {
    let Some(bus) = private_bus() else { return };
    let _svc = DbusService::start(Bus::Address(bus.address.clone()), |cfg| {
        if cfg == "lc/disk0" {
            Ok(())
        } else {
            Err(format!("no lun {cfg:?}"))
        }
    })
    .unwrap();
    let conn = zbus::blocking::connection::Builder::address(bus.address.as_str())
        .unwrap()
        .build()
        .unwrap();
    let om = zbus::blocking::fdo::ObjectManagerProxy::builder(&conn)
        .destination(BUS_NAME)
        .unwrap()
        .path(MANAGER_PATH)
        .unwrap()
        .build()
        .unwrap();
    let objects = om.get_managed_objects().unwrap();
    let paths: Vec<String> = objects.keys().map(|p| p.to_string()).collect();
    assert_eq!(
        paths,
        vec![HANDLER_PATH.to_string()],
        "exactly one user:lc object"
    );
    let ifaces = &objects.values().next().unwrap();
    let props = ifaces
        .iter()
        .find(|(k, _)| k.as_str() == "org.kernel.TCMUService1")
        .expect("interface")
        .1;
    let desc: String = props["ConfigDesc"].try_clone().unwrap().try_into().unwrap();
    assert!(desc.contains("lc/<lun>"), "{desc}");
    let call = |arg: &str| -> (bool, String) {
        conn.call_method(
            Some(BUS_NAME),
            HANDLER_PATH,
            Some("org.kernel.TCMUService1"),
            "CheckConfig",
            &(arg,),
        )
        .unwrap()
        .body()
        .deserialize()
        .unwrap()
    };
    assert_eq!(call("lc/disk0"), (true, String::new()));
    let (ok, why) = call("lc/bogus");
    assert!(!ok && why.contains("bogus"), "{why}");

    let e = DbusService::start(Bus::Address(bus.address.clone()), |_| Ok::<(), String>(()))
        .err()
        .unwrap();
    assert!(
        e.contains("already owned") && e.contains("tcmu-runner"),
        "{e}"
    );
}

#[test]
fn the_shipped_policy_lets_only_root_call_check_config() {
    let policy = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/targetcli/lc-dbus.conf"
    ))
    .unwrap();
    // The file's own <busconfig> body, included as is.
    let body = &policy[policy.find("<busconfig>").unwrap() + "<busconfig>".len()
        ..policy.find("</busconfig>").unwrap()];
    let Some(bus) = system_like_bus(body) else {
        return;
    };
    let _svc = DbusService::start(Bus::Address(bus.address.clone()), |cfg| {
        if cfg == "lc/disk0" {
            Ok(())
        } else {
            Err(format!("no lun {cfg:?}"))
        }
    })
    .expect("root may own the name under the shipped policy");
    // Root (targetcli creating a backstore) is answered.
    let conn = connect(&bus.address);
    assert_eq!(
        check_config(&conn, "lc/disk0").unwrap(),
        (true, String::new())
    );
    // Another user may list the handler and read its help, not call CheckConfig.
    let Some((ok, out)) = send_as_nobody(
        &bus.address,
        "org.freedesktop.DBus.ObjectManager.GetManagedObjects",
        &[],
    ) else {
        return;
    };
    assert!(ok && out.contains(HANDLER_PATH), "{out}");
    let (ok, out) = send_as_nobody(
        &bus.address,
        "org.kernel.TCMUService1.CheckConfig",
        &["string:lc/disk0"],
    )
    .unwrap();
    assert!(
        !ok && out.contains("AccessDenied") && out.contains("Rejected send message"),
        "the bus itself refuses: {out}"
    );
}

#[test]
fn the_daemon_refuses_check_config_from_other_users_behind_a_permissive_policy() {
    // tcmu-runner's policy (installed beside lc) lets anyone call the interface.
    let Some(bus) = system_like_bus(
        r#"<policy context="default">
    <allow own="org.kernel.TCMUService1"/>
    <allow send_destination="org.kernel.TCMUService1" send_interface="org.kernel.TCMUService1"/>
  </policy>"#,
    ) else {
        return;
    };
    let _svc =
        DbusService::start(Bus::Address(bus.address.clone()), |_| Ok::<(), String>(())).unwrap();
    assert_eq!(
        check_config(&connect(&bus.address), "lc/disk0").unwrap(),
        (true, String::new())
    );
    let Some((ok, out)) = send_as_nobody(
        &bus.address,
        "org.kernel.TCMUService1.CheckConfig",
        &["string:lc/disk0"],
    ) else {
        return;
    };
    assert!(
        !ok && out.contains("AccessDenied")
            && out.contains("CheckConfig is for root (caller uid 65534)"),
        "the daemon refuses: {out}"
    );
}

/// Every inotify event seen on `path` while `f` runs.
fn inotify_events(path: &Path, f: impl FnOnce()) -> rustix::fs::inotify::ReadFlags {
    use rustix::fs::inotify::{self, CreateFlags, ReadFlags, WatchFlags};
    let fd = inotify::init(CreateFlags::NONBLOCK | CreateFlags::CLOEXEC).unwrap();
    inotify::add_watch(&fd, path, WatchFlags::ALL_EVENTS).unwrap();
    f();
    let mut buf = [std::mem::MaybeUninit::uninit(); 4096];
    let mut r = inotify::Reader::new(&fd, &mut buf);
    let mut seen = ReadFlags::empty();
    loop {
        match r.next() {
            Ok(ev) => seen |= ev.events(),
            Err(rustix::io::Errno::AGAIN) => return seen,
            Err(e) => panic!("inotify: {e}"),
        }
    }
}

#[test]
fn check_config_opens_no_device_for_writing_and_names_no_other_lun_device() {
    use rustix::fs::inotify::ReadFlags;
    let dir = tempfile::tempdir().unwrap();
    let backing = dir.path().join("hdd.img");
    std::fs::File::create(&backing)
        .unwrap()
        .set_len(8 << 20)
        .unwrap();
    let secret = dir.path().join("other-lun-secret-path.img");
    let text = format!(
        "[[cache]]\nname = \"c0\"\ndevice = {:?}\n\
         [[lun]]\nname = \"disk0\"\ncache = \"c0\"\nbacking = {backing:?}\nbacking_id = 0\n\
         [[lun]]\nname = \"disk1\"\ncache = \"c0\"\nbacking = {secret:?}\nbacking_id = 1\n",
        dir.path().join("cache.img")
    );
    let cfg = lc::config::parse(&text, Path::new("/etc/lc/lc.toml")).unwrap();
    let Some(bus) = private_bus() else { return };
    // The check the daemon installs (daemon::serve), with no device served yet.
    let _svc = DbusService::start(Bus::Address(bus.address.clone()), move |c| {
        cfg.check_cfgstring(c, None, &[]).map(|_| ())
    })
    .unwrap();
    let conn = connect(&bus.address);
    let events = inotify_events(&backing, || {
        assert_eq!(
            check_config(&conn, "lc/disk0").unwrap(),
            (true, String::new())
        );
    });
    assert!(
        !events.intersects(ReadFlags::CLOSE_WRITE | ReadFlags::MODIFY | ReadFlags::ATTRIB),
        "CheckConfig opened or changed the backing file for writing: {events:?}"
    );
    // The watch does see a read-write open (the old CheckConfig did one).
    let events = inotify_events(&backing, || {
        drop(
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&backing)
                .unwrap(),
        )
    });
    assert!(events.contains(ReadFlags::CLOSE_WRITE), "{events:?}");
    // Refusals name the LUN asked for and its own device, not other LUNs' devices.
    let (ok, why) = check_config(&conn, "lc/disk1").unwrap();
    assert!(
        !ok && why.contains("disk1") && why.contains("other-lun-secret-path"),
        "{why}"
    );
    for bad in ["lc/nope", "lc/a:b"] {
        let (ok, why) = check_config(&conn, bad).unwrap();
        assert!(!ok, "{bad}");
        assert!(
            !why.contains("other-lun-secret-path") && !why.contains("hdd.img"),
            "{why}"
        );
    }
}

/// tcmu-runner's `/etc/dbus-1/system.d/tcmu-runner.conf` (Debian's package): anyone may
/// call the handler interface.
const TCMU_RUNNER_POLICY: &str = r#"<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-BUS Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <policy user="root">
    <allow own="org.kernel.TCMUService1"/>
  </policy>
  <policy context="default">
    <allow send_destination="org.kernel.TCMUService1"/>
    <allow own_prefix="org.kernel.TCMUService1.HandlerManager1"/>
    <allow send_interface="org.kernel.TCMUService1"/>
  </policy>
</busconfig>
"#;

#[test]
fn with_tcmu_runners_policy_installed_too_other_users_are_still_refused() {
    // dbus-daemon reads a policy directory in no defined order: whichever of the two
    // files comes last decides at the bus; the daemon's own check refuses regardless.
    for ours_first in [true, false] {
        let d = tempfile::tempdir().unwrap();
        let ours = || {
            std::fs::copy(
                concat!(env!("CARGO_MANIFEST_DIR"), "/targetcli/lc-dbus.conf"),
                d.path().join("lc.conf"),
            )
            .unwrap();
        };
        if ours_first {
            ours();
        }
        std::fs::write(d.path().join("tcmu-runner.conf"), TCMU_RUNNER_POLICY).unwrap();
        if !ours_first {
            ours();
        }
        let Some(bus) =
            system_like_bus(&format!("<includedir>{}</includedir>", d.path().display()))
        else {
            return;
        };
        let _svc = DbusService::start(Bus::Address(bus.address.clone()), |_| Ok::<(), String>(()))
            .unwrap();
        assert_eq!(
            check_config(&connect(&bus.address), "lc/disk0").unwrap(),
            (true, String::new()),
            "root is answered"
        );
        let Some((ok, out)) = send_as_nobody(
            &bus.address,
            "org.kernel.TCMUService1.CheckConfig",
            &["string:lc/disk0"],
        ) else {
            return;
        };
        assert!(!ok && out.contains("AccessDenied"), "{out}");
    }
}
