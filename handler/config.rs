//! The daemon's TOML configuration (`docs/CONFIG.md` is its reference) and the
//! validation of cfgstrings given to `targetcli`. Everything is checked once at load;
//! errors name the file and the key.

use std::collections::{BTreeMap, HashSet};
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
    /// Open the devices with O_DIRECT.
    #[serde(default)]
    pub o_direct: bool,
    /// RAM for segment buffers, e.g. "64MiB".
    #[serde(default = "default_ram")]
    pub ram_buffer: String,
    /// Tunables (see `lc_cache::Tunables`), e.g. `writeback_threshold = 50`.
    #[serde(default)]
    pub tunables: BTreeMap<String, toml::Value>,
}

fn default_ram() -> String {
    "64MiB".into()
}

/// `[[lun]]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
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
    pub lun: Vec<LunSection>,
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
    /// LUNs.
    pub luns: Vec<LunSection>,
}

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 32
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c))
}

/// Parses and validates a configuration text; `path` is used in messages.
pub fn parse(text: &str, path: &Path) -> Result<Loaded, String> {
    let at = |m: String| format!("config {}: {m}", path.display());
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
    let mut backings = HashSet::new();
    for l in &c.lun {
        if !valid_name(&l.name) {
            return Err(at(format!(
                "lun.name: {:?} must be 1-32 of [A-Za-z0-9_.-] (it is the cfgstring)",
                l.name
            )));
        }
        if !lun_names.insert(l.name.clone()) {
            return Err(at(format!("lun.name: {:?} defined twice", l.name)));
        }
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
        if !backings.insert(l.backing.clone()) {
            return Err(at(format!(
                "lun {}: backing: {} already used by another lun",
                l.name,
                l.backing.display()
            )));
        }
    }
    Ok(Loaded {
        path: path.to_path_buf(),
        daemon: c.daemon,
        caches,
        luns: c.lun,
    })
}

/// Reads and validates a configuration file.
pub fn load(path: &Path) -> Result<Loaded, String> {
    let text =
        std::fs::read_to_string(path).map_err(|e| format!("config {}: {e}", path.display()))?;
    parse(&text, path)
}

/// Size in bytes of a device or file.
pub fn device_size(path: &Path) -> Result<u64, String> {
    lc_cache::FileDevice::open(path, false)
        .map(|d| lc_cache::BlockDevice::size(&d))
        .map_err(|e| format!("{}: {e}", path.display()))
}

impl Loaded {
    /// Checks a cfgstring as targetcli passes it (`lc/<lun>`, or just `<lun>`): the LUN
    /// exists, its backing device exists and is not smaller than `size`, and no other
    /// active device serves it (`active` = LUN names being served).
    pub fn check_cfgstring(
        &self,
        cfg: &str,
        size: Option<u64>,
        active: &[String],
    ) -> Result<&LunSection, String> {
        let name = lun_name(cfg);
        if name.contains([',', ':', '\n']) {
            return Err(format!(
                "cfgstring {name:?} may not contain ',' ':' or newlines"
            ));
        }
        let lun = self.luns.iter().find(|l| l.name == name).ok_or_else(|| {
            let known: Vec<&str> = self.luns.iter().map(|l| l.name.as_str()).collect();
            format!(
                "no lun {name:?} in {} (known: {})",
                self.path.display(),
                known.join(", ")
            )
        })?;
        let bsize = device_size(&lun.backing)?;
        if let Some(s) = size {
            if s > bsize {
                return Err(format!(
                    "size {s} exceeds backing device {} ({bsize} bytes)",
                    lun.backing.display()
                ));
            }
        }
        if active.iter().any(|a| a == name) {
            return Err(format!(
                "lun {name:?} (backing {}) is already served by another device",
                lun.backing.display()
            ));
        }
        Ok(lun)
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
        parse(text, Path::new("/etc/lc/lc.toml")).unwrap_err()
    }

    #[test]
    fn a_good_config_loads() {
        let c = parse(GOOD, Path::new("x.toml")).unwrap();
        assert_eq!(c.caches[0].ram_bytes, 32 << 20);
        assert_eq!(c.caches[0].tunables.writeback_threshold, 50);
        assert_eq!(c.luns[0].backing_id, 0);
        assert_eq!(c.daemon.io_threads, 4);
        assert_eq!(c.daemon.busy_poll_us, 50);
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
        assert!(err(&dup).contains("already used by another lun"));
        assert!(err("[[cache]]\nname = \"c\"\n").contains("device"));
        assert!(err("not toml [").contains("/etc/lc/lc.toml"));
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
                .name,
            "disk0"
        );
        assert!(c
            .check_cfgstring("lc/disk0", Some(2 << 20), &[])
            .unwrap_err()
            .contains("exceeds"));
        assert!(c
            .check_cfgstring("lc/nope", None, &[])
            .unwrap_err()
            .contains("known: disk0"));
        assert!(c
            .check_cfgstring("lc/disk0", None, &["disk0".into()])
            .unwrap_err()
            .contains("already served"));
        assert!(c
            .check_cfgstring("lc/a:b", None, &[])
            .unwrap_err()
            .contains("':'"));
        let missing = parse(GOOD, Path::new("x.toml")).unwrap();
        assert!(missing
            .check_cfgstring("disk0", None, &[])
            .unwrap_err()
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
        for name in lc_cache::tunables::NAMES {
            assert!(
                doc.contains(&format!("`{name}`")),
                "docs/CONFIG.md lacks {name}"
            );
        }
    }
}
