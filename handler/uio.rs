//! Finding and opening TCMU devices: `/sys/class/uio/*/name`
//! (`tcm-user/<hba>/<name>/<subtype>/<cfgstring>`), the exact map size, `/dev/uioN`,
//! and the configfs files of a user backstore (`action/block_dev`,
//! `action/reset_ring`, `attrib/*`). Roots are parameters so tests use a fake tree.

use std::fs;
use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use crate::ring::Doorbell;
use crate::shm::SharedMap;

/// The doorbell of a real `/dev/uioN`: read 4 bytes to clear, write 4 bytes to kick;
/// ring resets through the backstore's configfs `action/` directory.
pub struct UioDoorbell {
    fd: OwnedFd,
    /// `.../core/user_<hba>/<name>/action`, once known.
    actions: Option<PathBuf>,
}

impl UioDoorbell {
    /// A doorbell on an open `/dev/uioN`.
    pub fn new(fd: OwnedFd) -> UioDoorbell {
        UioDoorbell { fd, actions: None }
    }

    /// Where the backstore's `action/block_dev` and `action/reset_ring` are.
    pub fn set_actions(&mut self, dir: PathBuf) {
        self.actions = Some(dir);
    }
}

impl Doorbell for UioDoorbell {
    fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
    fn ack(&self) -> io::Result<()> {
        let mut b = [0u8; 4];
        match rustix::io::read(&self.fd, &mut b) {
            Ok(_) => Ok(()),
            Err(e) if e == rustix::io::Errno::AGAIN => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
    fn kick(&self) -> io::Result<()> {
        rustix::io::write(&self.fd, &1u32.to_ne_bytes())?;
        Ok(())
    }
    /// tcmu-runner's recovery (`docs/TCMU.md` §6.4): block the device (new commands
    /// get BUSY meanwhile), reset the ring (outstanding ones complete BUSY, so
    /// initiators retry), unblock.
    fn reset_ring(&self) -> io::Result<bool> {
        let Some(dir) = &self.actions else {
            return Ok(false);
        };
        let blocked = write_existing(&dir.join("block_dev"), "1")?;
        let reset = write_existing(&dir.join("reset_ring"), "1");
        if blocked {
            write_existing(&dir.join("block_dev"), "0")?;
        }
        reset
    }
}

/// A TCMU device as seen in sysfs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UioDevice {
    /// `uioN`.
    pub uio: String,
    /// HBA index (`core/user_<hba>`).
    pub hba: u32,
    /// Storage object name.
    pub name: String,
    /// Handler subtype (`lc`).
    pub subtype: String,
    /// What follows `<subtype>/` in the dev_config.
    pub cfgstring: String,
}

/// Parses a UIO name; None for names that are not TCMU devices.
pub fn parse_name(name: &str) -> Option<(u32, String, String, String)> {
    let rest = name.trim_end_matches('\n').strip_prefix("tcm-user/")?;
    let mut parts = rest.splitn(4, '/');
    let hba = parts.next()?.parse().ok()?;
    let dev = parts.next()?.to_string();
    let subtype = parts.next()?.to_string();
    let cfg = parts.next().unwrap_or("").to_string();
    Some((hba, dev, subtype, cfg))
}

/// Parses the UIO name of any TCMU device, also one without a `dev_config`
/// (`tcm-user/<hba>/<name>`: subtype and cfgstring empty). None for other UIO devices.
pub fn parse_any_name(name: &str) -> Option<(u32, String, String, String)> {
    parse_name(name).or_else(|| {
        let rest = name.trim_end_matches('\n').strip_prefix("tcm-user/")?;
        let (hba, dev) = rest.split_once('/')?;
        if dev.is_empty() || dev.contains('/') {
            return None;
        }
        Some((
            hba.parse().ok()?,
            dev.to_string(),
            String::new(),
            String::new(),
        ))
    })
}

/// Every TCMU device under `<sysfs>/class/uio`, whatever its subtype (an empty
/// subtype: a device without `dev_config`), sorted by uio name.
pub fn scan_tcmu(sysfs: &Path) -> io::Result<Vec<UioDevice>> {
    let dir = sysfs.join("class/uio");
    let mut out = Vec::new();
    let entries = match fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(e),
    };
    for e in entries {
        let e = e?;
        let uio = e.file_name().to_string_lossy().into_owned();
        let Ok(name) = fs::read_to_string(e.path().join("name")) else {
            continue;
        };
        if let Some((hba, name, subtype, cfgstring)) = parse_any_name(&name) {
            out.push(UioDevice {
                uio,
                hba,
                name,
                subtype,
                cfgstring,
            });
        }
    }
    out.sort_by(|a, b| a.uio.cmp(&b.uio));
    Ok(out)
}

/// Every TCMU device of `subtype` under `<sysfs>/class/uio`.
pub fn scan(sysfs: &Path, subtype: &str) -> io::Result<Vec<UioDevice>> {
    let mut out = scan_tcmu(sysfs)?;
    out.retain(|u| u.subtype == subtype);
    Ok(out)
}

/// `maps/map0/size` of `uio` (printed in hex with 0x).
pub fn map_size(sysfs: &Path, uio: &str) -> io::Result<usize> {
    let p = sysfs.join("class/uio").join(uio).join("maps/map0/size");
    let t = fs::read_to_string(&p)?;
    let t = t.trim();
    let v = t
        .strip_prefix("0x")
        .map(|h| u64::from_str_radix(h, 16))
        .unwrap_or_else(|| t.parse())
        .map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{}: {t:?} is not a size", p.display()),
            )
        })?;
    usize::try_from(v).map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "map size too large"))
}

/// Opens `/dev/<uio>` and maps exactly `size` bytes.
///
/// The kernel lets one process at a time open a TCMU uio device (EBUSY otherwise). A
/// daemon killed a moment ago keeps it open until its last thread leaves the kernel
/// (a thread in a long device flush), so EBUSY is retried for up to `busy_wait`.
pub fn open(
    dev_dir: &Path,
    uio: &str,
    size: usize,
    busy_wait: std::time::Duration,
) -> io::Result<(SharedMap, UioDoorbell)> {
    let path = dev_dir.join(uio);
    let deadline = std::time::Instant::now() + busy_wait;
    let f = loop {
        match fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(&path)
        {
            Ok(f) => break f,
            Err(e)
                if e.raw_os_error() == Some(libc::EBUSY)
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            Err(e) => {
                let why = if e.raw_os_error() == Some(libc::EBUSY) {
                    " (another process has it open: a previous lc, or tcmu-runner)"
                } else {
                    ""
                };
                return Err(io::Error::new(
                    e.kind(),
                    format!("{}: {e}{why}", path.display()),
                ));
            }
        }
    };
    let fd: OwnedFd = f.into();
    let map = SharedMap::map(fd.as_fd(), size)?;
    Ok((map, UioDoorbell::new(fd)))
}

/// Reading a backstore's configfs state failed.
#[derive(Debug, thiserror::Error)]
pub enum ConfigfsError {
    /// The file could not be read (`NotFound`: the backstore is gone, or being
    /// removed: configfs unlinks its directory before the kernel tears it down).
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The file holds something else than the kernel prints there.
    #[error("{}: {text:?} is not {expected}", path.display())]
    Malformed {
        /// The file.
        path: PathBuf,
        /// What it held (at most 64 bytes of it).
        text: String,
        /// What was expected.
        expected: &'static str,
    },
}

/// Parses configfs `enable` (`target_dev_enable_show`: `"%d\n"` of whether the device
/// is configured): 0 while `enable` is still being written (the kernel's
/// `target_configure_device` sets the flag only after the backend's configure returns,
/// so also while a writer waits for our ADDED_DEVICE_DONE), 1 once it succeeded.
pub fn parse_enable(text: &str) -> Option<bool> {
    match text.strip_suffix('\n').unwrap_or(text) {
        "0" => Some(false),
        "1" => Some(true),
        _ => None,
    }
}

/// Parses `statistics/scsi_dev/indx` (`target_stat_indx_show`: `"%u\n"` of
/// `se_device.dev_index`, the `TCMU_ATTR_DEVICE_ID` of the device's netlink events).
pub fn parse_dev_index(text: &str) -> Option<u32> {
    let t = text.strip_suffix('\n').unwrap_or(text);
    if t.is_empty() || !t.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    t.parse().ok()
}

fn read_parsed<T>(
    path: PathBuf,
    expected: &'static str,
    parse: impl Fn(&str) -> Option<T>,
) -> Result<T, ConfigfsError> {
    let text = match fs::read_to_string(&path) {
        Ok(t) => t,
        Err(source) => return Err(ConfigfsError::Io { path, source }),
    };
    parse(&text).ok_or_else(|| ConfigfsError::Malformed {
        path,
        text: text.chars().take(64).collect(),
        expected,
    })
}

/// The configfs directory of user backstores (`.../target/core`).
#[derive(Clone, Debug)]
pub struct Configfs {
    /// Usually `/sys/kernel/config/target/core`.
    pub root: PathBuf,
}

impl Default for Configfs {
    fn default() -> Self {
        Configfs {
            root: PathBuf::from(crate::paths::CONFIGFS_CORE),
        }
    }
}

impl Configfs {
    /// The storage object's directory.
    pub fn dir(&self, hba: u32, name: &str) -> PathBuf {
        self.root.join(format!("user_{hba}")).join(name)
    }

    /// Writes `action/<file>`; a missing file (older kernel) is not an error.
    pub fn action(&self, hba: u32, name: &str, file: &str, value: &str) -> io::Result<bool> {
        write_existing(&self.dir(hba, name).join("action").join(file), value)
    }

    /// Reads `attrib/<file>`, trimmed.
    pub fn attrib(&self, hba: u32, name: &str, file: &str) -> Option<String> {
        fs::read_to_string(self.dir(hba, name).join("attrib").join(file))
            .ok()
            .map(|s| s.trim().to_string())
    }

    /// Reads a numeric attribute.
    pub fn attrib_u64(&self, hba: u32, name: &str, file: &str) -> Option<u64> {
        self.attrib(hba, name, file)?.parse().ok()
    }

    /// Whether the backstore is enabled (configfs `enable`, [`parse_enable`]).
    pub fn enabled(&self, hba: u32, name: &str) -> Result<bool, ConfigfsError> {
        read_parsed(self.dir(hba, name).join("enable"), "0 or 1", parse_enable)
    }

    /// The device's `se_device.dev_index` (`statistics/scsi_dev/indx`,
    /// [`parse_dev_index`]): the id a `*_DONE` reply must carry. The kernel assigns it
    /// before it configures the backend, so it is readable while `enable` waits.
    pub fn dev_index(&self, hba: u32, name: &str) -> Result<u32, ConfigfsError> {
        read_parsed(
            self.dir(hba, name).join("statistics/scsi_dev/indx"),
            "a device index (u32)",
            parse_dev_index,
        )
    }

    /// The unit serial (`wwn/vpd_unit_serial`, "T10 VPD Unit Serial Number: ...").
    pub fn unit_serial(&self, hba: u32, name: &str) -> Option<String> {
        let s = fs::read_to_string(self.dir(hba, name).join("wwn/vpd_unit_serial")).ok()?;
        let s = s.trim();
        Some(s.rsplit(':').next().unwrap_or(s).trim().to_string()).filter(|s| !s.is_empty())
    }
}

/// `/sys/module/target_core_user/parameters/<name>` writes (ENOENT tolerated).
pub fn module_param(sysfs: &Path, name: &str, value: &str) -> io::Result<bool> {
    write_existing(
        &sysfs.join("module/target_core_user/parameters").join(name),
        value,
    )
}

/// Writes an existing sysfs/configfs file (never creates one); false if it is absent.
fn write_existing(path: &Path, value: &str) -> io::Result<bool> {
    use std::io::Write;
    match fs::OpenOptions::new().write(true).open(path) {
        Ok(mut f) => f.write_all(value.as_bytes()).map(|_| true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(io::Error::new(e.kind(), format!("{}: {e}", path.display()))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_and_cfgstrings_keep_slashes() {
        assert_eq!(
            parse_name("tcm-user/3/disk0/lc/disk0\n"),
            Some((3, "disk0".into(), "lc".into(), "disk0".into()))
        );
        assert_eq!(
            parse_name("tcm-user/0/d/file//var/img").unwrap().3,
            "/var/img"
        );
        assert!(parse_name("tcm-user/0/d").is_none(), "no dev_config");
        assert!(parse_name("uio_pdrv").is_none());
        assert!(parse_name("tcm-user/x/d/lc/a").is_none());
    }

    #[test]
    fn scan_finds_only_our_subtype_and_reads_hex_sizes() {
        let t = tempfile::tempdir().unwrap();
        let mk = |uio: &str, name: &str| {
            let d = t.path().join("class/uio").join(uio);
            fs::create_dir_all(d.join("maps/map0")).unwrap();
            fs::write(d.join("name"), name).unwrap();
            fs::write(d.join("maps/map0/size"), "0x0000000040800000\n").unwrap();
        };
        mk("uio0", "tcm-user/0/a/lc/disk0\n");
        mk("uio1", "tcm-user/1/b/file//x\n");
        mk("uio2", "other\n");
        let found = scan(t.path(), "lc").unwrap();
        assert_eq!(found.len(), 1);
        assert_eq!(
            (found[0].uio.as_str(), found[0].cfgstring.as_str()),
            ("uio0", "disk0")
        );
        assert_eq!(map_size(t.path(), "uio0").unwrap(), 0x4080_0000);
        assert!(scan(&t.path().join("missing"), "lc").unwrap().is_empty());
    }

    #[test]
    fn any_tcmu_name_parses_also_without_dev_config() {
        assert_eq!(
            parse_any_name("tcm-user/2/d\n"),
            Some((2, "d".into(), String::new(), String::new()))
        );
        assert_eq!(parse_any_name("tcm-user/1/b/file//x").unwrap().2, "file");
        assert!(parse_any_name("tcm-user/2/").is_none());
        assert!(parse_any_name("tcm-user/x/d").is_none());
        assert!(parse_any_name("tcm-user/").is_none());
        assert!(parse_any_name("other").is_none());
    }

    #[test]
    fn scan_tcmu_lists_every_subtype() {
        let t = tempfile::tempdir().unwrap();
        for (uio, name) in [
            ("uio0", "tcm-user/0/a/lc/disk0\n"),
            ("uio1", "tcm-user/1/b/file//x\n"),
            ("uio2", "other\n"),
            ("uio3", "tcm-user/3/c\n"),
        ] {
            let d = t.path().join("class/uio").join(uio);
            fs::create_dir_all(&d).unwrap();
            fs::write(d.join("name"), name).unwrap();
        }
        // A uio directory without a readable name is skipped.
        fs::create_dir_all(t.path().join("class/uio/uio4")).unwrap();
        let all = scan_tcmu(t.path()).unwrap();
        let got: Vec<_> = all
            .iter()
            .map(|u| (u.uio.as_str(), u.hba, u.subtype.as_str()))
            .collect();
        assert_eq!(
            got,
            vec![("uio0", 0, "lc"), ("uio1", 1, "file"), ("uio3", 3, "")]
        );
        assert_eq!(scan(t.path(), "lc").unwrap().len(), 1);
    }

    #[test]
    fn enable_and_device_index_parse_strictly() {
        assert_eq!(parse_enable("0\n"), Some(false));
        assert_eq!(parse_enable("1\n"), Some(true));
        assert_eq!(parse_enable("1"), Some(true));
        for bad in ["", "\n", "2\n", " 1\n", "1\n\n", "yes", "01"] {
            assert_eq!(parse_enable(bad), None, "{bad:?}");
        }
        assert_eq!(parse_dev_index("0\n"), Some(0));
        assert_eq!(parse_dev_index("4294967295\n"), Some(u32::MAX));
        for bad in [
            "",
            "\n",
            "4294967296\n",
            "-1\n",
            "+1",
            " 7",
            "7 \n",
            "0x10",
            "1.5",
        ] {
            assert_eq!(parse_dev_index(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn configfs_enable_and_index_give_typed_errors() {
        let t = tempfile::tempdir().unwrap();
        let c = Configfs {
            root: t.path().to_path_buf(),
        };
        let d = c.dir(4, "d");
        assert!(matches!(
            c.enabled(4, "d"),
            Err(ConfigfsError::Io { ref source, .. }) if source.kind() == io::ErrorKind::NotFound
        ));
        fs::create_dir_all(d.join("statistics/scsi_dev")).unwrap();
        fs::write(d.join("enable"), "0\n").unwrap();
        fs::write(d.join("statistics/scsi_dev/indx"), "17\n").unwrap();
        assert!(!c.enabled(4, "d").unwrap());
        assert_eq!(c.dev_index(4, "d").unwrap(), 17);
        fs::write(d.join("enable"), "maybe\n").unwrap();
        fs::write(d.join("statistics/scsi_dev/indx"), vec![b'9'; 200]).unwrap();
        let e = c.enabled(4, "d").unwrap_err();
        assert!(e.to_string().contains("is not 0 or 1"), "{e}");
        match c.dev_index(4, "d").unwrap_err() {
            ConfigfsError::Malformed { text, .. } => assert_eq!(text.len(), 64),
            e => panic!("{e}"),
        }
        // Bytes that are not UTF-8 are an error, not a panic.
        fs::write(d.join("enable"), [0xff, 0xfe]).unwrap();
        assert!(matches!(c.enabled(4, "d"), Err(ConfigfsError::Io { .. })));
    }

    #[test]
    fn configfs_actions_tolerate_missing_files() {
        let t = tempfile::tempdir().unwrap();
        let c = Configfs {
            root: t.path().to_path_buf(),
        };
        fs::create_dir_all(c.dir(0, "d").join("action")).unwrap();
        fs::create_dir_all(c.dir(0, "d").join("attrib")).unwrap();
        fs::create_dir_all(c.dir(0, "d").join("wwn")).unwrap();
        fs::write(c.dir(0, "d").join("action/block_dev"), "").unwrap();
        assert!(c.action(0, "d", "block_dev", "1").unwrap());
        assert!(!c.action(0, "d", "reset_ring", "1").unwrap());
        fs::write(c.dir(0, "d").join("attrib/hw_block_size"), "4096\n").unwrap();
        assert_eq!(c.attrib_u64(0, "d", "hw_block_size"), Some(4096));
        fs::write(
            c.dir(0, "d").join("wwn/vpd_unit_serial"),
            "T10 VPD Unit Serial Number: 1234-abcd\n",
        )
        .unwrap();
        assert_eq!(c.unit_serial(0, "d").as_deref(), Some("1234-abcd"));
    }
}
