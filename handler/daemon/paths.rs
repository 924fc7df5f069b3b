//! Where the kernel's files are: sysfs, the device nodes, configfs. Every kernel path
//! the daemon uses is found from here (tests point it elsewhere).

use std::path::PathBuf;

use crate::uio::Configfs;

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
            sysfs: PathBuf::from("/sys"),
            dev: PathBuf::from("/dev"),
            configfs: Configfs::default(),
        }
    }
}
