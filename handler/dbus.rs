//! The D-Bus face targetcli looks for (`docs/TCMU.md` §5): the name
//! `org.kernel.TCMUService1` on the system bus, an ObjectManager at
//! `/org/kernel/TCMUService1`, and exactly one object under it,
//! `/org/kernel/TCMUService1/lc`, with interface `org.kernel.TCMUService1`
//! (property `ConfigDesc`, method `CheckConfig(s) -> (bs)`).
//!
//! zbus's blocking connection runs its own executor thread; [`DbusService`] keeps the
//! connection alive and releases the name when dropped.
//!
//! `CheckConfig` is for root: the bus policy (`targetcli/lc-dbus.conf`) lets only root
//! send it, and the handler itself asks the bus for the caller's uid and answers any
//! other caller than root (or the daemon's own user) with `AccessDenied`, so a missing
//! or older policy file does not open it to every local user. The check it runs looks
//! at devices read-only (`config::probe_device`).

use std::fmt::Display;

use zbus::blocking::connection::Builder;
use zbus::blocking::Connection;

/// Bus name targetcli talks to.
pub const BUS_NAME: &str = "org.kernel.TCMUService1";
/// Object path of the ObjectManager.
pub const MANAGER_PATH: &str = "/org/kernel/TCMUService1";
/// Object path of the lc handler.
pub const HANDLER_PATH: &str = "/org/kernel/TCMUService1/lc";

/// What `targetcli` shows as help for `cfgstring`.
pub const CONFIG_DESC: &str =
    "lc/<lun>: the name of a [[lun]] in /etc/lc/lc.toml (its cache and backing device). \
The size given to create must not exceed the backing device. Example: cfgstring=disk0";

/// Validates a cfgstring: None, or the reason it is refused as sent to targetcli.
type CheckFn = Box<dyn Fn(&str) -> Option<String> + Send + Sync>;

struct LcHandler {
    check: CheckFn,
}

/// Whether a caller of `CheckConfig` with this uid is served: root, or the user the
/// daemon runs as (a test daemon on a private bus).
pub fn caller_allowed(caller_uid: u32, daemon_uid: u32) -> bool {
    caller_uid == 0 || caller_uid == daemon_uid
}

#[zbus::interface(name = "org.kernel.TCMUService1")]
impl LcHandler {
    /// Help text for the cfgstring.
    #[zbus(property)]
    fn config_desc(&self) -> String {
        CONFIG_DESC.to_string()
    }

    /// Validates a configuration string (with its "lc/" prefix): (ok, reason). Callers
    /// other than root get `AccessDenied`.
    #[zbus(out_args("is_valid", "message"))]
    async fn check_config(
        &self,
        cfgstring: &str,
        #[zbus(header)] hdr: zbus::message::Header<'_>,
        #[zbus(connection)] conn: &zbus::Connection,
    ) -> zbus::fdo::Result<(bool, String)> {
        let sender = hdr
            .sender()
            .ok_or_else(|| zbus::fdo::Error::AccessDenied("caller unknown".into()))?
            .to_owned();
        let uid = zbus::fdo::DBusProxy::new(conn)
            .await?
            .get_connection_unix_user(sender.into())
            .await?;
        if !caller_allowed(uid, rustix::process::geteuid().as_raw()) {
            return Err(zbus::fdo::Error::AccessDenied(format!(
                "CheckConfig is for root (caller uid {uid})"
            )));
        }
        Ok(match (self.check)(cfgstring) {
            None => (true, String::new()),
            Some(reason) => (false, reason),
        })
    }
}

/// The running D-Bus service.
pub struct DbusService {
    _conn: Connection,
}

/// Where to connect.
#[derive(Clone, Debug)]
pub enum Bus {
    /// The system bus.
    System,
    /// A bus at this address (tests).
    Address(String),
}

/// How long a taken bus name is asked for again before the daemon refuses to start.
const NAME_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Why the D-Bus service did not start.
#[derive(Debug, thiserror::Error)]
pub enum DbusError {
    /// Another process owns `org.kernel.TCMUService1` (tcmu-runner, most likely): lc
    /// must not run beside it.
    #[error(
        "D-Bus name {BUS_NAME} is already owned (is tcmu-runner running? it answers device events for \
         subtypes it does not know with an error; stop it: systemctl stop tcmu-runner)"
    )]
    NameTaken,
    /// The bus could not be reached or refused to serve the objects.
    #[error("D-Bus: {0}")]
    Bus(#[from] zbus::Error),
}

impl DbusService {
    /// Owns the name and serves the objects. Fails clearly when the name is taken
    /// (tcmu-runner running). `check` answers `CheckConfig`: its error is the reason
    /// targetcli prints, so it should name nothing but the LUN asked for.
    pub fn start<E: Display>(
        bus: Bus,
        check: impl Fn(&str) -> Result<(), E> + Send + Sync + 'static,
    ) -> Result<DbusService, DbusError> {
        let builder = match &bus {
            Bus::System => Builder::system(),
            Bus::Address(a) => Builder::address(a.as_str()),
        }?;
        let conn = builder
            .serve_at(MANAGER_PATH, zbus::fdo::ObjectManager)
            .and_then(|b| {
                b.serve_at(
                    HANDLER_PATH,
                    LcHandler {
                        check: Box::new(move |c| check(c).err().map(|e| e.to_string())),
                    },
                )
            })
            .and_then(|b| b.build())?;
        // A predecessor killed a moment ago may still own the name until the bus
        // notices its connection is gone: ask again for a few seconds before refusing.
        let deadline = std::time::Instant::now() + NAME_WAIT;
        loop {
            let flags = zbus::fdo::RequestNameFlags::DoNotQueue.into();
            match conn.request_name_with_flags(BUS_NAME, flags) {
                Ok(
                    zbus::fdo::RequestNameReply::PrimaryOwner
                    | zbus::fdo::RequestNameReply::AlreadyOwner,
                ) => return Ok(DbusService { _conn: conn }),
                Ok(_) | Err(zbus::Error::NameTaken) => {
                    if std::time::Instant::now() >= deadline {
                        return Err(DbusError::NameTaken);
                    }
                    std::thread::sleep(std::time::Duration::from_millis(250));
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_root_or_the_daemons_own_user_may_check() {
        assert!(caller_allowed(0, 0));
        assert!(caller_allowed(0, 1000));
        assert!(caller_allowed(1000, 1000));
        assert!(!caller_allowed(1000, 0));
        assert!(!caller_allowed(65534, 1000));
    }
}
