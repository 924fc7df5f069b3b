//! Where the kernel's files are: sysfs, the device nodes, configfs. Every kernel path
//! lc uses starts from here; the daemon takes them as [`Paths`] so tests can point
//! elsewhere.

use std::path::PathBuf;

use crate::uio::Configfs;

/// The sysfs root.
pub const SYSFS: &str = "/sys";
/// The device nodes.
pub const DEV: &str = "/dev";
/// LIO's configfs target core (`<configfs>/target/core`).
pub const CONFIGFS_CORE: &str = "/sys/kernel/config/target/core";

/// Where the kernel's files are (parameters so tests can point elsewhere).
#[derive(Clone, Debug)]
pub struct Paths {
    /// sysfs root, `/sys`.
    pub sysfs: PathBuf,
    /// Device nodes, `/dev`.
    pub dev: PathBuf,
    /// configfs target core, `/sys/kernel/config/target/core`.
    pub configfs: Configfs,
}

impl Default for Paths {
    fn default() -> Self {
        Paths {
            sysfs: PathBuf::from(SYSFS),
            dev: PathBuf::from(DEV),
            configfs: Configfs::default(),
        }
    }
}
