//! The daemon's TOML configuration (`docs/CONFIG.md` is its reference) and the
//! validation of cfgstrings given to `targetcli`. Everything is checked once at load;
//! errors name the file and the key.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use lc_cache::Tunables;
use serde::Deserialize;

use crate::units::parse_size;

/// `[daemon]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DaemonSection {
    /// Control socket path.
    #[serde(default = "default_socket")]
    pub control_socket: PathBuf,
    /// error, warning, info, debug.
    #[serde(default = "default_level")]
    pub log_level: String,
    /// I/O worker threads.
    #[serde(default = "default_io_threads")]
    pub io_threads: usize,
    /// Own `org.kernel.TCMUService1` on the system bus (for targetcli).
    #[serde(default = "yes")]
    pub dbus: bool,
    /// Microseconds the event loop keeps polling idle rings before it sleeps.
    #[serde(default = "default_busy_poll_us")]
    pub busy_poll_us: u64,
    /// Read cached data from the cache device through an io_uring of the event loop
    /// (no worker thread per read) where the kernel allows it.
    #[serde(default = "yes")]
    pub io_uring: bool,
    /// Serve Prometheus metrics over HTTP on this address (`GET /metrics`); off when
    /// absent.
    #[serde(default)]
    pub metrics_listen: Option<std::net::SocketAddr>,
}

fn default_socket() -> PathBuf {
    PathBuf::from("/run/lc/control.sock")
}
fn default_level() -> String {
    "info".into()
}
fn default_io_threads() -> usize {
    4
}
fn default_busy_poll_us() -> u64 {
    50
}
fn yes() -> bool {
    true
}

impl Default for DaemonSection {
    fn default() -> Self {
        DaemonSection {
            control_socket: default_socket(),
            log_level: default_level(),
            io_threads: default_io_threads(),
            dbus: true,
            busy_poll_us: default_busy_poll_us(),
            io_uring: true,
            metrics_listen: None,
        }
    }
}

/// `[[cache]]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheSection {
    /// Name used by `[[lun]]` and the CLI.
    pub name: String,
    /// Cache device (formatted with `lc format`).
    pub device: PathBuf,
    /// Open the devices with O_DIRECT (default: on; docs/CONFIG.md says why).
    #[serde(default = "default_o_direct")]
    pub o_direct: bool,
    /// RAM for segment buffers, e.g. "64MiB".
    #[serde(default = "default_ram")]
    pub ram_buffer: String,
    /// Tunables (see `lc_cache::Tunables`), e.g. `writeback_threshold = 50`.
    #[serde(default)]
    pub tunables: BTreeMap<String, toml::Value>,
}

fn default_o_direct() -> bool {
    true
}

fn default_ram() -> String {
    "64MiB".into()
}

/// What serves a `[[lun]]`'s blocks (`backend = ...`).
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// The cache engine over a backing device (the default).
    #[default]
    Cache,
    /// RAM of the daemon, no cache engine and no device: for measuring the TCMU path
    /// itself. The data is lost when the daemon stops or the backstore goes.
    Ram,
}

/// `[[lun]]` as written: the keys of every backend (validated into a [`LunSection`]
/// or a [`RamLun`] by [`parse`]).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LunEntry {
    /// The cfgstring that selects it.
    pub name: String,
    /// What serves it.
    #[serde(default)]
    pub backend: BackendKind,
    /// `backend = "cache"`: name of its `[[cache]]`.
    pub cache: Option<String>,
    /// `backend = "cache"`: backing device.
    pub backing: Option<PathBuf>,
    /// `backend = "cache"`: id of the backing device inside the cache.
    pub backing_id: Option<u8>,
    /// `backend = "ram"`: the RAM it may use, the largest capacity of its backstore.
    pub size: Option<String>,
}

/// A `[[lun]]` served from RAM (`backend = "ram"`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RamLun {
    /// The cfgstring that selects it.
    pub name: String,
    /// Bytes: the largest `size` a backstore of it may have.
    pub size: u64,
}

/// A `[[lun]]` served by the cache engine (`backend = "cache"`, the default).
#[derive(Clone, Debug)]
pub struct LunSection {
    /// The cfgstring that selects it: `targetcli ... cfgstring=<name>`.
    pub name: String,
    /// Name of its `[[cache]]`.
    pub cache: String,
    /// Backing device.
    pub backing: PathBuf,
    /// Id of the backing device inside the cache, 0..=254, unique per cache.
    pub backing_id: u8,
}

/// The whole file.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// `[daemon]`.
    #[serde(default)]
    pub daemon: DaemonSection,
    /// `[[cache]]` sections.
    #[serde(default)]
    pub cache: Vec<CacheSection>,
    /// `[[lun]]` sections.
    #[serde(default)]
    pub lun: Vec<LunEntry>,
}

/// A validated cache section.
#[derive(Clone, Debug)]
pub struct CacheConfig {
    /// The section.
    pub section: CacheSection,
    /// Parsed RAM budget.
    pub ram_bytes: u64,
    /// Parsed tunables.
    pub tunables: Tunables,
}

/// A loaded, validated configuration.
#[derive(Clone, Debug)]
pub struct Loaded {
    /// Where it came from.
    pub path: PathBuf,
    /// `[daemon]`.
    pub daemon: DaemonSection,
    /// Caches.
    pub caches: Vec<CacheConfig>,
    /// LUNs served by the cache engine.
    pub luns: Vec<LunSection>,
    /// LUNs served from RAM (`backend = "ram"`).
    pub ram_luns: Vec<RamLun>,
}

/// Why a configuration file is refused. Every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file cannot be read.
    #[error("config {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// A syntax error, an unknown or missing key, or a value out of range (the
    /// message names the key).
    #[error("config {}: {message}", path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong, starting with the key.
        message: String,
    },
    /// One device configured under two keys (two LUNs on one backing device, or the
    /// cache device reused as a backing device), possibly through two different paths.
    #[error("{0}")]
    SameDevice(Box<DeviceClash>),
    /// A `[[lun]]` whose keys do not fit its `backend`.
    #[error("config {}: lun {lun}: {problem}", path.display())]
    Lun {
        /// The file.
        path: PathBuf,
        /// The LUN's name.
        lun: String,
        /// What is wrong.
        problem: LunProblem,
    },
}

/// What is wrong with a `[[lun]]`'s keys for its backend.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LunProblem {
    /// A key `backend = "cache"` needs is missing.
    #[error("{0}: required (backend = \"cache\")")]
    Missing(&'static str),
    /// A key of the cache engine given to a RAM LUN.
    #[error("{0}: not a key of backend = \"ram\" (a RAM LUN has no cache or backing device)")]
    NotForRam(&'static str),
    /// `size` given to a cache LUN.
    #[error("size: only for backend = \"ram\" (a cache LUN's capacity is its backing device's)")]
    SizeWithoutRam,
    /// A RAM LUN without `size`.
    #[error("size: required for backend = \"ram\", e.g. size = \"1GiB\"")]
    RamWithoutSize,
    /// `size` is not a size.
    #[error("size: {0}")]
    BadSize(crate::units::SizeError),
    /// `size` is zero or not whole 4 KiB blocks.
    #[error("size: {0} bytes is not a positive multiple of 4096")]
    RamSize(u64),
}

/// One device configured under two keys, or a partition and its whole disk.
#[derive(Debug, thiserror::Error)]
#[error(
    "config {}: {second} ({}) {overlap} {first} ({}); each device may be configured once",
    file.display(),
    second_path.display(),
    first_path.display()
)]
pub struct DeviceClash {
    /// The configuration file.
    pub file: PathBuf,
    /// The key that names the device first.
    pub first: DeviceKey,
    /// Its path under that key.
    pub first_path: PathBuf,
    /// The key that names it again.
    pub second: DeviceKey,
    /// Its path under that key.
    pub second_path: PathBuf,
    /// How the second overlaps the first.
    pub overlap: Overlap,
}

/// How two configured devices overlap.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Overlap {
    /// The same block device, or the same file.
    Same,
    /// The second is a partition of the first.
    PartitionOf,
    /// The second is the whole disk the first is a partition of.
    DiskOf,
}

impl fmt::Display for Overlap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Overlap::Same => "is the same device as",
            Overlap::PartitionOf => "is a partition of",
            Overlap::DiskOf => "is the whole disk holding",
        })
    }
}

/// The key under which a device is configured.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DeviceKey {
    /// `device` of the `[[cache]]` of this name.
    Cache(String),
    /// `backing` of the `[[lun]]` of this name.
    Lun(String),
}

impl fmt::Display for DeviceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceKey::Cache(n) => write!(f, "cache {n}: device"),
            DeviceKey::Lun(n) => write!(f, "lun {n}: backing"),
        }
    }
}

/// What a configured path designates, so that one device reached through two paths
/// (a symlink, `/dev/disk/by-id/...`, a bind mount, a hard link) is recognised.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum DeviceIdentity {
    /// A block device: its device number.
    Block(u64),
    /// A regular file: (device, inode).
    File(u64, u64),
    /// Anything else, or not present yet: its canonical path (lexically normalised
    /// when it does not exist).
    Path(PathBuf),
}

fn device_identity(path: &Path) -> DeviceIdentity {
    match std::fs::metadata(path) {
        Ok(m) if m.file_type().is_block_device() => DeviceIdentity::Block(m.rdev()),
        Ok(m) if m.is_file() => DeviceIdentity::File(m.dev(), m.ino()),
        _ => DeviceIdentity::Path(
            std::fs::canonicalize(path).unwrap_or_else(|_| path.components().collect::<PathBuf>()),
        ),
    }
}

/// The whole disk a partition belongs to (its device number), from
/// `<sysfs>/dev/block/MAJ:MIN`; None for a whole disk or when sysfs does not say.
fn whole_disk(sysfs: &Path, rdev: u64) -> Option<u64> {
    let node = sysfs.join(format!(
        "dev/block/{}:{}",
        rustix::fs::major(rdev),
        rustix::fs::minor(rdev)
    ));
    let real = std::fs::canonicalize(node).ok()?;
    if !real.join("partition").exists() {
        return None;
    }
    let text = std::fs::read_to_string(real.parent()?.join("dev")).ok()?;
    let (major, minor) = text.trim().split_once(':')?;
    Some(rustix::fs::makedev(
        major.parse().ok()?,
        minor.parse().ok()?,
    ))
}

/// Refuses a device configured under two keys (`devices` in file order), or a
/// partition beside its whole disk (`sysfs` tells which is which).
fn check_distinct_devices(
    file: &Path,
    devices: &[(DeviceKey, &Path)],
    sysfs: &Path,
) -> Result<(), ConfigError> {
    let ids: Vec<(DeviceIdentity, Option<u64>)> = devices
        .iter()
        .map(|(_, p)| {
            let id = device_identity(p);
            let disk = match id {
                DeviceIdentity::Block(rdev) => whole_disk(sysfs, rdev),
                _ => None,
            };
            (id, disk)
        })
        .collect();
    for (i, (id, disk)) in ids.iter().enumerate() {
        for (j, (earlier, earlier_disk)) in ids[..i].iter().enumerate() {
            let overlap = match (id, earlier) {
                _ if id == earlier => Overlap::Same,
                (DeviceIdentity::Block(a), DeviceIdentity::Block(b)) => {
                    if *disk == Some(*b) {
                        Overlap::PartitionOf
                    } else if *earlier_disk == Some(*a) {
                        Overlap::DiskOf
                    } else {
                        continue;
                    }
                }
                _ => continue,
            };
            return Err(ConfigError::SameDevice(Box::new(DeviceClash {
                file: file.to_path_buf(),
                first: devices[j].0.clone(),
                first_path: devices[j].1.to_path_buf(),
                second: devices[i].0.clone(),
                second_path: devices[i].1.to_path_buf(),
                overlap,
            })));
        }
    }
    Ok(())
}

/// Why a cfgstring is refused (D-Bus `CheckConfig`, netlink `ADDED_DEVICE`, the
/// control socket's `check`). Messages name the LUN asked for and its own backing
/// device, never other LUNs' devices.
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    /// Characters the kernel or rtslib would split or refuse.
    #[error("cfgstring {name:?} may not contain ',' ':' or newlines")]
    BadCharacters {
        /// The LUN name asked for.
        name: String,
    },
    /// No `[[lun]]` of that name.
    #[error("no lun {name:?} in {} (known: {})", file.display(), known.join(", "))]
    UnknownLun {
        /// The LUN name asked for.
        name: String,
        /// The configuration file.
        file: PathBuf,
        /// The configured LUN names.
        known: Vec<String>,
    },
    /// The LUN's backing device is unusable.
    #[error("lun {lun:?}: backing device {}: {source}", path.display())]
    Backing {
        /// The LUN.
        lun: String,
        /// Its backing device.
        path: PathBuf,
        /// Why.
        source: ProbeError,
    },
    /// The size asked for exceeds the backing device.
    #[error("size {size} exceeds backing device {} ({backing_size} bytes)", path.display())]
    TooLarge {
        /// Size asked for.
        size: u64,
        /// The backing device.
        path: PathBuf,
        /// Its size.
        backing_size: u64,
    },
    /// Another TCMU device serves the LUN already.
    #[error("lun {lun:?} (backing {}) is already served by another device", path.display())]
    AlreadyServed {
        /// The LUN.
        lun: String,
        /// Its backing device.
        path: PathBuf,
    },
    /// The size asked for exceeds a RAM LUN's `size`.
    #[error("size {size} exceeds ram lun {lun:?} (size {ram_size} bytes in the config)")]
    RamTooLarge {
        /// Size asked for.
        size: u64,
        /// The LUN.
        lun: String,
        /// Its configured size.
        ram_size: u64,
    },
    /// Another TCMU device serves the RAM LUN already.
    #[error("ram lun {lun:?} is already served by another device")]
    RamAlreadyServed {
        /// The LUN.
        lun: String,
    },
}

/// The `[[lun]]` a cfgstring names.
#[derive(Clone, Copy, Debug)]
pub enum LunRef<'a> {
    /// Served by the cache engine.
    Cache(&'a LunSection),
    /// Served from RAM.
    Ram(&'a RamLun),
}

impl LunRef<'_> {
    /// The LUN's name (its cfgstring).
    pub fn name(&self) -> &str {
        match self {
            LunRef::Cache(l) => &l.name,
            LunRef::Ram(r) => &r.name,
        }
    }
}

/// Why [`probe_device`] finds a device unusable.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// It does not exist or cannot be looked at.
    #[error("{0}")]
    Stat(#[source] io::Error),
    /// A directory, character device, socket...
    #[error("not a block device or regular file")]
    NotBlockOrFile,
    /// A block device that cannot be opened read-only.
    #[error("cannot open read-only: {0}")]
    Open(#[source] io::Error),
    /// A block device whose size cannot be read.
    #[error("cannot read its size: {0}")]
    Size(#[source] io::Error),
}

/// Size in bytes of a block device or regular file, found without writing or locking
/// anything: a file is only `stat`ed, a block device opened read-only without
/// `O_EXCL` (so it works while the daemon, a mount or device-mapper holds it).
pub fn probe_device(path: &Path) -> Result<u64, ProbeError> {
    let meta = std::fs::metadata(path).map_err(ProbeError::Stat)?;
    if meta.is_file() {
        return Ok(meta.len());
    }
    if !meta.file_type().is_block_device() {
        return Err(ProbeError::NotBlockOrFile);
    }
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_CLOEXEC | libc::O_NONBLOCK)
        .open(path)
        .map_err(ProbeError::Open)?;
    f.seek(SeekFrom::End(0)).map_err(ProbeError::Size)
}

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 32
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c))
}

/// Parses and validates a configuration text; `path` is used in messages.
pub fn parse(text: &str, path: &Path) -> Result<Loaded, ConfigError> {
    let at = |message: String| ConfigError::Invalid {
        path: path.to_path_buf(),
        message,
    };
    let c: Config = toml::from_str(text).map_err(|e| at(e.to_string()))?;
    if !["error", "warning", "info", "debug"].contains(&c.daemon.log_level.as_str()) {
        return Err(at(format!(
            "daemon.log_level: {:?} is not one of error, warning, info, debug",
            c.daemon.log_level
        )));
    }
    if c.daemon.io_threads == 0 || c.daemon.io_threads > 256 {
        return Err(at(format!(
            "daemon.io_threads: {} out of range 1..=256",
            c.daemon.io_threads
        )));
    }
    if c.daemon.busy_poll_us > 10_000 {
        return Err(at(format!(
            "daemon.busy_poll_us: {} out of range 0..=10000",
            c.daemon.busy_poll_us
        )));
    }
    let mut caches = Vec::new();
    let mut names = HashSet::new();
    for s in &c.cache {
        if !valid_name(&s.name) {
            return Err(at(format!(
                "cache.name: {:?} must be 1-32 of [A-Za-z0-9_.-]",
                s.name
            )));
        }
        if !names.insert(s.name.clone()) {
            return Err(at(format!("cache.name: {:?} defined twice", s.name)));
        }
        let ram_bytes = parse_size(&s.ram_buffer)
            .map_err(|e| at(format!("cache {}: ram_buffer: {e}", s.name)))?;
        let mut t = Tunables::default();
        for (k, v) in &s.tunables {
            let text = match v {
                toml::Value::String(x) => x.clone(),
                toml::Value::Integer(i) => i.to_string(),
                toml::Value::Boolean(b) => b.to_string(),
                other => {
                    return Err(at(format!(
                        "cache {}: tunables.{k}: unsupported value {other}",
                        s.name
                    )))
                }
            };
            t.set(k, &text)
                .map_err(|e| at(format!("cache {}: tunables.{k}: {e}", s.name)))?;
        }
        caches.push(CacheConfig {
            section: s.clone(),
            ram_bytes,
            tunables: t,
        });
    }
    let mut lun_names = HashSet::new();
    let mut ids = HashSet::new();
    let mut luns = Vec::new();
    let mut ram_luns = Vec::new();
    for e in &c.lun {
        if !valid_name(&e.name) {
            return Err(at(format!(
                "lun.name: {:?} must be 1-32 of [A-Za-z0-9_.-] (it is the cfgstring)",
                e.name
            )));
        }
        if !lun_names.insert(e.name.clone()) {
            return Err(at(format!("lun.name: {:?} defined twice", e.name)));
        }
        let problem = |problem| ConfigError::Lun {
            path: path.to_path_buf(),
            lun: e.name.clone(),
            problem,
        };
        let l = match e.backend {
            BackendKind::Ram => {
                ram_luns.push(ram_lun(e).map_err(problem)?);
                continue;
            }
            BackendKind::Cache => cache_lun(e).map_err(problem)?,
        };
        if !names.contains(&l.cache) {
            return Err(at(format!(
                "lun {}: cache: no [[cache]] named {:?}",
                l.name, l.cache
            )));
        }
        if l.backing_id == 255 {
            return Err(at(format!(
                "lun {}: backing_id: 255 is reserved (0..=254)",
                l.name
            )));
        }
        if !ids.insert((l.cache.clone(), l.backing_id)) {
            return Err(at(format!(
                "lun {}: backing_id: {} already used in cache {}",
                l.name, l.backing_id, l.cache
            )));
        }
        luns.push(l);
    }
    let devices: Vec<(DeviceKey, &Path)> = c
        .cache
        .iter()
        .map(|s| (DeviceKey::Cache(s.name.clone()), s.device.as_path()))
        .chain(
            luns.iter()
                .map(|l| (DeviceKey::Lun(l.name.clone()), l.backing.as_path())),
        )
        .collect();
    check_distinct_devices(path, &devices, Path::new(crate::paths::SYSFS))?;
    Ok(Loaded {
        path: path.to_path_buf(),
        daemon: c.daemon,
        caches,
        luns,
        ram_luns,
    })
}

/// A `[[lun]]` of the cache engine: `cache`, `backing`, `backing_id`, no `size`.
fn cache_lun(e: &LunEntry) -> Result<LunSection, LunProblem> {
    if e.size.is_some() {
        return Err(LunProblem::SizeWithoutRam);
    }
    Ok(LunSection {
        name: e.name.clone(),
        cache: e.cache.clone().ok_or(LunProblem::Missing("cache"))?,
        backing: e.backing.clone().ok_or(LunProblem::Missing("backing"))?,
        backing_id: e.backing_id.ok_or(LunProblem::Missing("backing_id"))?,
    })
}

/// A `[[lun]]` served from RAM: `size` (whole 4 KiB blocks), none of the engine's keys.
fn ram_lun(e: &LunEntry) -> Result<RamLun, LunProblem> {
    for (key, given) in [
        ("cache", e.cache.is_some()),
        ("backing", e.backing.is_some()),
        ("backing_id", e.backing_id.is_some()),
    ] {
        if given {
            return Err(LunProblem::NotForRam(key));
        }
    }
    let text = e.size.as_deref().ok_or(LunProblem::RamWithoutSize)?;
    let size = parse_size(text).map_err(LunProblem::BadSize)?;
    if size == 0 || !size.is_multiple_of(4096) {
        return Err(LunProblem::RamSize(size));
    }
    Ok(RamLun {
        name: e.name.clone(),
        size,
    })
}

/// Reads and validates a configuration file.
pub fn load(path: &Path) -> Result<Loaded, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse(&text, path)
}

impl Loaded {
    /// Checks a cfgstring as targetcli passes it (`lc/<lun>`, or just `<lun>`): the LUN
    /// exists, its backing device is a block device or regular file not smaller than
    /// `size` (looked at read-only: [`probe_device`]) or, for a RAM LUN, its configured
    /// size is not smaller, and no other active device serves it (`active` = LUN names
    /// being served).
    pub fn check_cfgstring(
        &self,
        cfg: &str,
        size: Option<u64>,
        active: &[String],
    ) -> Result<LunRef<'_>, CheckError> {
        let name = lun_name(cfg);
        if name.contains([',', ':', '\n']) {
            return Err(CheckError::BadCharacters {
                name: name.to_string(),
            });
        }
        if let Some(r) = self.ram_luns.iter().find(|r| r.name == name) {
            if let Some(s) = size.filter(|s| *s > r.size) {
                return Err(CheckError::RamTooLarge {
                    size: s,
                    lun: r.name.clone(),
                    ram_size: r.size,
                });
            }
            if active.iter().any(|a| a == name) {
                return Err(CheckError::RamAlreadyServed {
                    lun: r.name.clone(),
                });
            }
            return Ok(LunRef::Ram(r));
        }
        let lun =
            self.luns
                .iter()
                .find(|l| l.name == name)
                .ok_or_else(|| CheckError::UnknownLun {
                    name: name.to_string(),
                    file: self.path.clone(),
                    known: self
                        .luns
                        .iter()
                        .map(|l| l.name.clone())
                        .chain(self.ram_luns.iter().map(|r| r.name.clone()))
                        .collect(),
                })?;
        let bsize = probe_device(&lun.backing).map_err(|source| CheckError::Backing {
            lun: lun.name.clone(),
            path: lun.backing.clone(),
            source,
        })?;
        if let Some(s) = size {
            if s > bsize {
                return Err(CheckError::TooLarge {
                    size: s,
                    path: lun.backing.clone(),
                    backing_size: bsize,
                });
            }
        }
        if active.iter().any(|a| a == name) {
            return Err(CheckError::AlreadyServed {
                lun: lun.name.clone(),
                path: lun.backing.clone(),
            });
        }
        Ok(LunRef::Cache(lun))
    }
}

/// The LUN a cfgstring names, as targetcli and the kernel pass it: `lc/<lun>` or
/// `<lun>`, with the trailing newline a `dev_config` write may carry.
pub fn lun_name(cfgstring: &str) -> &str {
    let name = cfgstring.trim_end_matches('\n');
    name.strip_prefix("lc/").unwrap_or(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[daemon]
control_socket = "/tmp/x.sock"
log_level = "debug"

[[cache]]
name = "c0"
device = "/dev/nvme0n1"
ram_buffer = "32MiB"
[cache.tunables]
writeback_threshold = 50
writeback_enabled = true

[[lun]]
name = "disk0"
cache = "c0"
backing = "/dev/sda"
backing_id = 0
"#;

    fn err(text: &str) -> String {
        parse(text, Path::new("/etc/lc/lc.toml"))
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn a_good_config_loads() {
        let c = parse(GOOD, Path::new("x.toml")).unwrap();
        assert_eq!(c.caches[0].ram_bytes, 32 << 20);
        assert_eq!(c.caches[0].tunables.writeback_threshold, 50);
        assert_eq!(c.luns[0].backing_id, 0);
        assert_eq!(c.daemon.io_threads, 4);
        assert_eq!(c.daemon.busy_poll_us, 50);
        assert!(c.daemon.io_uring);
    }

    #[test]
    fn every_bad_key_is_named() {
        assert!(err("[daemon]\nbogus = 1").contains("bogus"));
        assert!(err("[daemon]\nlog_level = \"loud\"").contains("daemon.log_level"));
        assert!(err("[daemon]\nbusy_poll_us = 20000").contains("daemon.busy_poll_us"));
        assert!(
            err(&GOOD.replace("writeback_threshold = 50", "writeback_threshold = 500"))
                .contains("tunables.writeback_threshold")
        );
        assert!(err(&GOOD.replace("writeback_threshold", "nonsense")).contains("tunables.nonsense"));
        assert!(err(&GOOD.replace("32MiB", "lots")).contains("ram_buffer"));
        assert!(
            err(&GOOD.replace("cache = \"c0\"", "cache = \"c9\"")).contains("no [[cache]] named")
        );
        assert!(err(&GOOD.replace("name = \"disk0\"", "name = \"disk:0\"")).contains("lun.name"));
        assert!(err(&GOOD.replace("backing_id = 0", "backing_id = 255")).contains("backing_id"));
        assert!(err(&GOOD.replace("backing_id = 0", "backing_id = 300")).contains("backing_id"));
        let dup = format!("{GOOD}\n[[lun]]\nname = \"disk1\"\ncache = \"c0\"\nbacking = \"/dev/sdb\"\nbacking_id = 0\n");
        assert!(err(&dup).contains("already used in cache"));
        let dup = format!("{GOOD}\n[[lun]]\nname = \"disk1\"\ncache = \"c0\"\nbacking = \"/dev/sda\"\nbacking_id = 1\n");
        assert!(
            err(&dup).contains(
                "lun disk1: backing (/dev/sda) is the same device as lun disk0: backing (/dev/sda)"
            ),
            "{}",
            err(&dup)
        );
        assert!(err("[[cache]]\nname = \"c\"\n").contains("device"));
        assert!(err("not toml [").contains("/etc/lc/lc.toml"));
    }

    #[test]
    fn a_ram_lun_takes_a_size_and_none_of_the_engine_keys() {
        let ram = "\n[[lun]]\nname = \"ram0\"\nbackend = \"ram\"\nsize = \"1GiB\"\n";
        let c = parse(&format!("{GOOD}{ram}"), Path::new("x.toml")).unwrap();
        assert_eq!(
            c.ram_luns,
            vec![RamLun {
                name: "ram0".into(),
                size: 1 << 30
            }]
        );
        assert_eq!(c.luns.len(), 1, "the engine LUN stays an engine LUN");
        // Alone, without any cache.
        let c = parse(ram, Path::new("x.toml")).unwrap();
        assert!(c.luns.is_empty() && c.caches.is_empty());
        // The cfgstring check: its size bounds the backstore's; one device at a time.
        assert!(matches!(
            c.check_cfgstring("lc/ram0", Some(1 << 30), &[]),
            Ok(LunRef::Ram(r)) if r.name == "ram0"
        ));
        assert!(matches!(
            c.check_cfgstring("ram0", Some(2 << 30), &[]),
            Err(CheckError::RamTooLarge { .. })
        ));
        assert!(matches!(
            c.check_cfgstring("ram0", None, &["ram0".into()]),
            Err(CheckError::RamAlreadyServed { .. })
        ));
        let problem = |text: &str| match parse(text, Path::new("x.toml")) {
            Err(ConfigError::Lun { lun, problem, .. }) => {
                assert_eq!(lun, "ram0");
                problem
            }
            other => panic!("{other:?}"),
        };
        let with = |line: &str| format!("{ram}{line}\n");
        assert_eq!(
            problem(&with("cache = \"c0\"")),
            LunProblem::NotForRam("cache")
        );
        assert_eq!(
            problem(&with("backing = \"/dev/sdb\"")),
            LunProblem::NotForRam("backing")
        );
        assert_eq!(
            problem(&with("backing_id = 1")),
            LunProblem::NotForRam("backing_id")
        );
        assert_eq!(
            problem(&ram.replace("size = \"1GiB\"\n", "")),
            LunProblem::RamWithoutSize
        );
        assert_eq!(
            problem(&ram.replace("1GiB", "1000")),
            LunProblem::RamSize(1000)
        );
        assert_eq!(problem(&ram.replace("1GiB", "0")), LunProblem::RamSize(0));
        assert!(matches!(
            problem(&ram.replace("1GiB", "lots")),
            LunProblem::BadSize(_)
        ));
        let e = err(&ram.replace("\"ram\"", "\"rom\""));
        assert!(e.contains("rom") && e.contains("ram"), "{e}");
        assert!(
            err(&with("cache = \"c0\""))
                .contains("lun ram0: cache: not a key of backend = \"ram\""),
            "{}",
            err(&with("cache = \"c0\""))
        );
        // Engine LUNs: the engine's keys are required, size is refused.
        let e = err(&GOOD.replace("backing_id = 0\n", ""));
        assert!(e.contains("lun disk0: backing_id: required"), "{e}");
        let e = err(&GOOD.replace("backing_id = 0\n", "backing_id = 0\nsize = \"1GiB\"\n"));
        assert!(
            e.contains("lun disk0: size: only for backend = \"ram\""),
            "{e}"
        );
        // One name space for both kinds.
        let e = err(&format!("{GOOD}{}", ram.replace("ram0", "disk0")));
        assert!(e.contains("defined twice"), "{e}");
    }

    fn two_luns(cache: &Path, a: &Path, b: &Path) -> String {
        format!(
            "[[cache]]\nname = \"c0\"\ndevice = {cache:?}\n\
             [[lun]]\nname = \"disk0\"\ncache = \"c0\"\nbacking = {a:?}\nbacking_id = 0\n\
             [[lun]]\nname = \"disk1\"\ncache = \"c0\"\nbacking = {b:?}\nbacking_id = 1\n"
        )
    }

    #[test]
    fn one_device_under_two_keys_is_refused_naming_both_even_through_other_paths() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        for f in ["cache.img", "a.img", "b.img"] {
            std::fs::File::create(d.join(f))
                .unwrap()
                .set_len(1 << 20)
                .unwrap();
        }
        std::os::unix::fs::symlink(d.join("a.img"), d.join("a-link")).unwrap();
        std::fs::hard_link(d.join("a.img"), d.join("a-hard")).unwrap();
        std::fs::create_dir(d.join("sub")).unwrap();
        let (cache, a, b) = (d.join("cache.img"), d.join("a.img"), d.join("b.img"));
        let parse_err = |text: String| {
            parse(&text, Path::new("/etc/lc/lc.toml"))
                .unwrap_err()
                .to_string()
        };
        // Distinct devices load.
        parse(&two_luns(&cache, &a, &b), Path::new("x.toml")).unwrap();
        // The same file by a symlink, a hard link, a path with `..`: (st_dev, st_ino).
        for other in [d.join("a-link"), d.join("a-hard"), d.join("sub/../a.img")] {
            let e = parse_err(two_luns(&cache, &a, &other));
            assert!(
                e.starts_with("config /etc/lc/lc.toml: lun disk1: backing (")
                    && e.contains("is the same device as lun disk0: backing (")
                    && e.contains(&format!("({})", other.display())),
                "{e}"
            );
        }
        // The cache device reused as a backing device.
        let e = parse_err(two_luns(&cache, &a, &d.join("./cache.img")));
        assert!(
            e.contains("lun disk1: backing") && e.contains("same device as cache c0: device"),
            "{e}"
        );
        // Paths that do not exist yet are compared after normalisation.
        let e = parse_err(two_luns(
            &cache,
            Path::new("/dev/nonexistent-lc"),
            Path::new("/dev//nonexistent-lc/"),
        ));
        assert!(e.contains("same device"), "{e}");
        // A block device under two names (st_rdev), when the machine has one.
        let blocks: Vec<PathBuf> = std::fs::read_dir("/dev")
            .unwrap()
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| std::fs::symlink_metadata(p).is_ok_and(|m| m.file_type().is_block_device()))
            .collect();
        if let Some(blk) = blocks.first() {
            std::os::unix::fs::symlink(blk, d.join("blk-link")).unwrap();
            let e = parse_err(two_luns(&cache, blk, &d.join("blk-link")));
            assert!(e.contains("same device"), "{e}");
        } else {
            eprintln!("no block device in /dev: the st_rdev case is not exercised here");
        }
    }

    #[test]
    fn a_partition_beside_its_whole_disk_is_refused() {
        // Device nodes need root (mknod); sysfs is a fake tree in the same directory.
        if !rustix::process::geteuid().is_root() {
            eprintln!("not root: no device nodes, the partition case is not exercised");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let sysfs = d.join("sys");
        let disk = sysfs.join("devices/virtual/block/sdz");
        std::fs::create_dir_all(disk.join("sdz1")).unwrap();
        std::fs::create_dir_all(disk.join("sdz2")).unwrap();
        std::fs::write(disk.join("dev"), "259:100\n").unwrap();
        std::fs::write(disk.join("sdz1/partition"), "1\n").unwrap();
        std::fs::write(disk.join("sdz2/partition"), "2\n").unwrap();
        std::fs::create_dir_all(sysfs.join("dev/block")).unwrap();
        for (node, target) in [
            ("259:100", "sdz"),
            ("259:101", "sdz/sdz1"),
            ("259:102", "sdz/sdz2"),
        ] {
            std::os::unix::fs::symlink(
                format!("../../devices/virtual/block/{target}"),
                sysfs.join("dev/block").join(node),
            )
            .unwrap();
        }
        let node = |name: &str, minor: u32| {
            let p = d.join(name);
            rustix::fs::mknodat(
                rustix::fs::CWD,
                &p,
                rustix::fs::FileType::BlockDevice,
                rustix::fs::Mode::from_raw_mode(0o600),
                rustix::fs::makedev(259, minor),
            )
            .unwrap();
            p
        };
        let (whole, p1, p2) = (node("sdz", 100), node("sdz1", 101), node("sdz2", 102));
        let cache = d.join("cache.img");
        std::fs::File::create(&cache).unwrap();
        let check = |a: &Path, b: &Path| {
            let devices = [
                (DeviceKey::Cache("c0".into()), cache.as_path()),
                (DeviceKey::Lun("disk0".into()), a),
                (DeviceKey::Lun("disk1".into()), b),
            ];
            check_distinct_devices(Path::new("lc.toml"), &devices, &sysfs)
                .map_err(|e| e.to_string())
        };
        // Two partitions of one disk are distinct devices.
        check(&p1, &p2).unwrap();
        let e = check(&whole, &p2).unwrap_err();
        assert!(
            e.contains("lun disk1: backing") && e.contains("is a partition of lun disk0: backing"),
            "{e}"
        );
        let e = check(&p1, &whole).unwrap_err();
        assert!(
            e.contains("is the whole disk holding lun disk0: backing"),
            "{e}"
        );
    }

    #[test]
    fn probing_a_block_device_opens_it_read_only() {
        use rustix::fs::inotify::{self, CreateFlags, ReadFlags, WatchFlags};
        // A private node (mknod: root) for a harmless block device, so that only this
        // test's opens are seen through it.
        let sys = Path::new("/sys/class/block");
        let Some(loopdev) = (0..8)
            .map(|i| sys.join(format!("loop{i}")))
            .find(|p| p.join("dev").exists())
        else {
            eprintln!("no loop device: the block-device probe is not exercised");
            return;
        };
        if !rustix::process::geteuid().is_root() {
            eprintln!("not root: the block-device probe is not exercised");
            return;
        }
        let text = std::fs::read_to_string(loopdev.join("dev")).unwrap();
        let (major, minor) = text.trim().split_once(':').unwrap();
        let dir = tempfile::tempdir().unwrap();
        let node = dir.path().join("blk");
        rustix::fs::mknodat(
            rustix::fs::CWD,
            &node,
            rustix::fs::FileType::BlockDevice,
            rustix::fs::Mode::from_raw_mode(0o600),
            rustix::fs::makedev(major.parse().unwrap(), minor.parse().unwrap()),
        )
        .unwrap();
        let ino = inotify::init(CreateFlags::NONBLOCK | CreateFlags::CLOEXEC).unwrap();
        inotify::add_watch(&ino, &node, WatchFlags::ALL_EVENTS).unwrap();
        let sectors: u64 = std::fs::read_to_string(loopdev.join("size"))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert_eq!(probe_device(&node).unwrap(), sectors * 512);
        let mut buf = [std::mem::MaybeUninit::uninit(); 4096];
        let mut r = inotify::Reader::new(&ino, &mut buf);
        let mut seen = ReadFlags::empty();
        loop {
            match r.next() {
                Ok(ev) => seen |= ev.events(),
                Err(rustix::io::Errno::AGAIN) => break,
                Err(e) => panic!("inotify: {e}"),
            }
        }
        assert!(
            seen.contains(ReadFlags::OPEN | ReadFlags::CLOSE_NOWRITE),
            "{seen:?}"
        );
        assert!(!seen.contains(ReadFlags::CLOSE_WRITE), "{seen:?}");
    }

    #[test]
    fn probing_a_backing_device_opens_nothing_for_writing() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("b.img");
        std::fs::File::create(&f).unwrap().set_len(3 << 20).unwrap();
        assert_eq!(probe_device(&f).unwrap(), 3 << 20);
        // A file the daemon holds exclusively (flock) is still probed.
        let held = lc_cache::FileDevice::open_exclusive(&f, false).unwrap();
        assert_eq!(probe_device(&f).unwrap(), 3 << 20);
        drop(held);
        assert!(matches!(
            probe_device(dir.path()),
            Err(ProbeError::NotBlockOrFile)
        ));
        assert!(matches!(
            probe_device(&dir.path().join("missing")),
            Err(ProbeError::Stat(_))
        ));
    }

    #[test]
    fn cfgstrings_are_checked_against_the_config_and_the_backing_size() {
        let dir = tempfile::tempdir().unwrap();
        let b = dir.path().join("b.img");
        std::fs::File::create(&b).unwrap().set_len(1 << 20).unwrap();
        let text = GOOD.replace("/dev/sda", b.to_str().unwrap());
        let c = parse(&text, Path::new("x.toml")).unwrap();
        assert_eq!(
            c.check_cfgstring("lc/disk0", Some(1 << 20), &[])
                .unwrap()
                .name(),
            "disk0"
        );
        assert!(c
            .check_cfgstring("lc/disk0", Some(2 << 20), &[])
            .unwrap_err()
            .to_string()
            .contains("exceeds"));
        assert!(c
            .check_cfgstring("lc/nope", None, &[])
            .unwrap_err()
            .to_string()
            .contains("known: disk0"));
        assert!(c
            .check_cfgstring("lc/disk0", None, &["disk0".into()])
            .unwrap_err()
            .to_string()
            .contains("already served"));
        assert!(c
            .check_cfgstring("lc/a:b", None, &[])
            .unwrap_err()
            .to_string()
            .contains("':'"));
        let missing = parse(GOOD, Path::new("x.toml")).unwrap();
        assert!(missing
            .check_cfgstring("disk0", None, &[])
            .unwrap_err()
            .to_string()
            .contains("/dev/sda"));
    }
}

#[cfg(test)]
mod example_tests {
    #[test]
    fn the_shipped_example_config_is_valid() {
        let text = include_str!("../examples/lc.toml");
        let c = super::parse(text, std::path::Path::new("examples/lc.toml")).unwrap();
        assert_eq!(c.luns[0].name, "disk0");
        // Every tunable documented in CONFIG.md exists.
        let doc = include_str!("../docs/CONFIG.md");
        for key in ["name", "backend", "cache", "backing", "backing_id", "size"] {
            assert!(
                doc.contains(&format!("| `{key}` |")),
                "docs/CONFIG.md lacks the [[lun]] key {key}"
            );
        }
        for name in lc_cache::tunables::NAMES {
            assert!(
                doc.contains(&format!("`{name}`")),
                "docs/CONFIG.md lacks {name}"
            );
        }
    }
}
