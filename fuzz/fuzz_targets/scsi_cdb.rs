//! Arbitrary CDB + Data-Out through the SCSI emulation over an in-memory disk: every
//! response must be GOOD or CHECK CONDITION with sense, never a panic.
#![no_main]

use std::sync::Mutex;

use libfuzzer_sys::fuzz_target;
use lc::scsi::{execute, BlockBackend, IoError, LunConfig, LunState};

struct Mem(Mutex<Vec<u8>>);

impl BlockBackend for Mem {
    fn read(&self, o: u64, bufs: &mut [&mut [u8]]) -> Result<(), IoError> {
        let d = self.0.lock().unwrap();
        let mut at = o as usize;
        for b in bufs.iter_mut() {
            b.copy_from_slice(&d[at..at + b.len()]);
            at += b.len();
        }
        Ok(())
    }
    fn write(&self, o: u64, data: &[&[u8]], _fua: bool) -> Result<(), IoError> {
        let mut d = self.0.lock().unwrap();
        let mut at = o as usize;
        for b in data {
            d[at..at + b.len()].copy_from_slice(b);
            at += b.len();
        }
        Ok(())
    }
    fn flush(&self) -> Result<(), IoError> {
        Ok(())
    }
    fn discard(&self, o: u64, l: u64) -> Result<(), IoError> {
        self.0.lock().unwrap()[o as usize..(o + l) as usize].fill(0);
        Ok(())
    }
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let cdb_len = (data[0] as usize % 32).min(data.len() - 1);
    let (cdb, out) = data[1..].split_at(cdb_len);
    let lun = LunState::new(LunConfig { max_unmap_blocks: 256, ..LunConfig::new("fuzz", 512, 2048) });
    let mem = Mem(Mutex::new(vec![0; 2048 * 512]));
    let r = execute(&lun, cdb, out, 1 << 16, &mem);
    assert!(r.status == 0 || (r.status == 2 && !r.sense.is_empty()));
});
