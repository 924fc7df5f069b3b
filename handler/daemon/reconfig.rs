//! The RECONFIG policy: which live attribute writes of a served device lc accepts.

use crate::error::{Error, Result};
use crate::netlink::Reconfig;
use crate::scsi::LunState;

/// Applies a RECONFIG event (a live write of `attrib/dev_size`,
/// `attrib/emulate_write_cache` or `attrib/dev_config`) to a served LUN and says what
/// changed; an error refuses the change (the kernel then fails the attribute write
/// and keeps the old value).
pub(super) fn reconfigure(
    state: &LunState,
    lun: &str,
    backing_size: u64,
    change: &Reconfig,
) -> Result<String> {
    match change {
        Reconfig::Size(size) => {
            let bs = state.cfg.block_size as u64;
            if *size == 0 || size % bs != 0 {
                return Err(Error::DevSizeNotBlocks {
                    size: *size,
                    block_size: bs,
                });
            }
            if *size > backing_size {
                return Err(Error::DevSizeTooLarge {
                    size: *size,
                    lun: lun.to_string(),
                    backing_size,
                });
            }
            state.resize(size / bs);
            Ok(format!("capacity now {} blocks of {bs} bytes", size / bs))
        }
        Reconfig::WriteCache(on) => {
            state.set_write_cache(*on);
            Ok(format!("write cache {}", if *on { "on" } else { "off" }))
        }
        Reconfig::Config(c) => {
            if crate::config::lun_name(c) == lun {
                Ok("cfgstring unchanged".into())
            } else {
                Err(Error::SwitchLun {
                    lun: lun.to_string(),
                    cfgstring: c.trim_end_matches('\n').to_string(),
                })
            }
        }
        Reconfig::Unknown => Err(Error::UnknownReconfig),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scsi::LunConfig;

    #[test]
    fn reconfig_resizes_within_the_backing_device_and_toggles_the_write_cache() {
        let st = LunState::new(LunConfig::new("s", 512, 100));
        let backing = 1 << 20;
        let r = |c: Reconfig| reconfigure(&st, "disk0", backing, &c);
        assert!(r(Reconfig::Size(1 << 20)).is_ok());
        assert_eq!(st.num_blocks(), 2048);
        let e = r(Reconfig::Size((1 << 20) + 512)).unwrap_err();
        assert!(
            matches!(e, Error::DevSizeTooLarge { backing_size, .. } if backing_size == 1 << 20),
            "{e}"
        );
        assert!(e.to_string().contains("exceeds the backing device"), "{e}");
        let e = r(Reconfig::Size(1000)).unwrap_err();
        assert!(
            matches!(
                e,
                Error::DevSizeNotBlocks {
                    size: 1000,
                    block_size: 512
                }
            ),
            "{e}"
        );
        assert!(matches!(
            r(Reconfig::Size(0)),
            Err(Error::DevSizeNotBlocks { size: 0, .. })
        ));
        assert_eq!(st.num_blocks(), 2048, "refused sizes change nothing");
        assert!(r(Reconfig::WriteCache(false)).is_ok());
        assert!(!st.write_cache());
        assert!(r(Reconfig::WriteCache(true)).is_ok());
        assert!(st.write_cache());
        assert!(r(Reconfig::Config("lc/disk0\n".into())).is_ok());
        let e = r(Reconfig::Config("lc/disk1".into())).unwrap_err();
        assert!(
            matches!(&e, Error::SwitchLun { cfgstring, .. } if cfgstring == "lc/disk1"),
            "{e}"
        );
        assert!(e.to_string().contains("delete the backstore"), "{e}");
        assert!(matches!(r(Reconfig::Unknown), Err(Error::UnknownReconfig)));
    }
}
