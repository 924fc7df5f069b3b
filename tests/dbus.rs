//! The D-Bus service on a private bus (Debian package `dbus`): what targetcli reads
//! (ObjectManager.GetManagedObjects with exactly the lc object and its ConfigDesc) and
//! calls (CheckConfig), and the refusal when the name is already owned.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

use lc::dbus::{Bus, DbusService, BUS_NAME, HANDLER_PATH, MANAGER_PATH};

struct PrivateBus {
    child: Child,
    address: String,
    _dir: tempfile::TempDir,
}

impl Drop for PrivateBus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn private_bus() -> PrivateBus {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new("dbus-daemon")
        .args(["--session", "--nofork", "--print-address=1"])
        .arg(format!(
            "--address=unix:path={}",
            dir.path().join("bus").display()
        ))
        .stdout(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!("cannot start dbus-daemon ({e}): install Debian's `dbus` package (.ci/run does)")
        });
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    PrivateBus {
        child,
        address: line.trim().to_string(),
        _dir: dir,
    }
}

#[test]
fn targetcli_sees_user_lc_and_check_config_answers() {
    let bus = private_bus();
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
