//! Opening what a configuration names: a cache device with the backing devices of its
//! LUNs, each for the daemon's exclusive use (waiting a while for a predecessor that
//! still holds it).

use std::sync::Arc;
use std::time::Duration;

use slog::{error, warn, Logger};

use lc_cache::{Backing, BlockDevice, Cache, FileDevice, OpenOptions};

use crate::config::{CacheConfig, LunSection};
use crate::error::{Error, Result};

/// Opens a cache or backing device for the daemon's exclusive use. A device still busy
/// is asked for again for a while: a predecessor killed a moment ago holds its devices
/// until its last thread leaves the kernel (a long flush on a slow disk).
fn open_exclusive(
    path: &std::path::Path,
    direct: bool,
    log: &Logger,
) -> std::io::Result<FileDevice> {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let mut said = false;
    loop {
        match FileDevice::open_exclusive(path, direct) {
            Err(e)
                if e.kind() == std::io::ErrorKind::ResourceBusy
                    && std::time::Instant::now() < deadline =>
            {
                if !said {
                    warn!(log, "device busy, waiting up to 20 s for it"; "device" => path.display().to_string());
                    said = true;
                }
                std::thread::sleep(Duration::from_millis(200));
            }
            Ok(d) => {
                if direct && !d.is_direct() {
                    warn!(log, "o_direct: the file system refuses O_DIRECT; served through the page cache"; "device" => path.display().to_string());
                }
                return Ok(d);
            }
            Err(e) => return Err(e),
        }
    }
}

/// Opens a LUN's backing device for a cache.
pub(super) fn open_backing(l: &LunSection, direct: bool, log: &Logger) -> Result<Backing> {
    let dev: Arc<dyn BlockDevice> =
        Arc::new(open_exclusive(&l.backing, direct, log).map_err(|source| {
            Error::BackingDevice {
                lun: l.name.clone(),
                source,
            }
        })?);
    Ok(Backing {
        id: l.backing_id,
        dev,
        label: l.name.clone(),
    })
}

/// Opens one configured cache with the backing devices of its LUNs.
pub(super) fn open_cache(c: &CacheConfig, luns: &[LunSection], log: &Logger) -> Result<Arc<Cache>> {
    let s = &c.section;
    let dev: Arc<dyn BlockDevice> = Arc::new(open_exclusive(&s.device, s.o_direct, log).map_err(
        |source| Error::CacheDevice {
            cache: s.name.clone(),
            source,
        },
    )?);
    let backing = luns
        .iter()
        .filter(|l| l.cache == s.name)
        .map(|l| open_backing(l, s.o_direct, log))
        .collect::<Result<Vec<_>>>()?;
    let (cache, report) = Cache::open(
        dev,
        backing,
        OpenOptions {
            ram_bytes: c.ram_bytes,
            tunables: c.tunables.clone(),
            logger: log.new(slog::o!("cache" => s.name.clone())),
        },
    )
    .map_err(|source| Error::Cache {
        cache: s.name.clone(),
        source,
    })?;
    if !report.damaged.is_empty() {
        error!(log, "cache log damaged: reads of lost data fail until rewritten or `lc accept-loss`";
               "cache" => &s.name, "segments" => format!("{:?}", report.damaged));
    }
    Ok(Arc::new(cache))
}
