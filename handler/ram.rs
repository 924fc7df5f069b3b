//! A LUN served from the daemon's RAM without the cache engine (`backend = "ram"` in
//! `[[lun]]`): the ceiling of the TCMU path itself (ring, SCSI emulation, event loop)
//! for benchmarks. Nothing is durable: the data lives as long as the served device.

use std::sync::RwLock;

use crate::scsi::{BlockBackend, IoError, IoErrorKind};

/// Bytes per chunk: the unit of allocation (on first write) and of locking.
const CHUNK: usize = 1 << 20;

/// Blocks in RAM, allocated a chunk at a time on first write; unwritten chunks read
/// as zeros. Never blocks on a device, so every command is served on the loop thread.
pub struct RamBackend {
    size: u64,
    chunks: Vec<RwLock<Option<Box<[u8]>>>>,
}

impl RamBackend {
    /// An empty (all zeros) LUN of `size` bytes; no memory is taken until written.
    pub fn new(size: u64) -> RamBackend {
        let n = size.div_ceil(CHUNK as u64) as usize;
        RamBackend {
            size,
            chunks: (0..n).map(|_| RwLock::new(None)).collect(),
        }
    }

    /// Its capacity in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Bytes of RAM taken by written chunks.
    pub fn allocated(&self) -> u64 {
        self.chunks
            .iter()
            .filter(|c| c.read().unwrap_or_else(|e| e.into_inner()).is_some())
            .count() as u64
            * CHUNK as u64
    }

    /// The pieces of `[offset, offset + len)`: (chunk, offset in chunk, length, offset
    /// in the caller's buffer).
    fn pieces(
        &self,
        offset: u64,
        len: usize,
    ) -> Result<impl Iterator<Item = (usize, usize, usize, usize)>, IoError> {
        if offset
            .checked_add(len as u64)
            .is_none_or(|end| end > self.size)
        {
            return Err(IoError {
                offset: Some(offset),
                message: format!(
                    "{len} bytes at {offset} beyond the RAM LUN's {} bytes",
                    self.size
                ),
                kind: IoErrorKind::Target,
            });
        }
        let mut done = 0;
        Ok(std::iter::from_fn(move || {
            if done == len {
                return None;
            }
            let at = offset + done as u64;
            let chunk = (at / CHUNK as u64) as usize;
            let within = (at % CHUNK as u64) as usize;
            let n = (CHUNK - within).min(len - done);
            let piece = (chunk, within, n, done);
            done += n;
            Some(piece)
        }))
    }
}

impl RamBackend {
    fn read_one(&self, offset: u64, buf: &mut [u8]) -> Result<(), IoError> {
        for (c, within, n, at) in self.pieces(offset, buf.len())? {
            let chunk = self.chunks[c].read().unwrap_or_else(|e| e.into_inner());
            let out = &mut buf[at..at + n];
            match chunk.as_deref() {
                Some(data) => out.copy_from_slice(&data[within..within + n]),
                None => out.fill(0),
            }
        }
        Ok(())
    }

    fn write_one(&self, offset: u64, data: &[u8]) -> Result<(), IoError> {
        for (c, within, n, at) in self.pieces(offset, data.len())? {
            let mut chunk = self.chunks[c].write().unwrap_or_else(|e| e.into_inner());
            let mem = chunk.get_or_insert_with(|| vec![0u8; CHUNK].into_boxed_slice());
            mem[within..within + n].copy_from_slice(&data[at..at + n]);
        }
        Ok(())
    }
}

impl BlockBackend for RamBackend {
    /// Each piece is copied straight from the chunks (checked whole first, so nothing
    /// is read or written for a transfer that ends beyond the LUN).
    fn read(&self, offset: u64, bufs: &mut [&mut [u8]]) -> Result<(), IoError> {
        let total = bufs.iter().map(|b| b.len()).sum();
        let _ = self.pieces(offset, total)?;
        let mut at = offset;
        for b in bufs.iter_mut() {
            self.read_one(at, b)?;
            at += b.len() as u64;
        }
        Ok(())
    }
    fn write(&self, offset: u64, data: &[&[u8]], _fua: bool) -> Result<(), IoError> {
        let total = data.iter().map(|b| b.len()).sum();
        let _ = self.pieces(offset, total)?;
        let mut at = offset;
        for d in data {
            self.write_one(at, d)?;
            at += d.len() as u64;
        }
        Ok(())
    }
    fn flush(&self) -> Result<(), IoError> {
        Ok(())
    }
    fn discard(&self, offset: u64, len: u64) -> Result<(), IoError> {
        let len = usize::try_from(len).map_err(|_| IoError {
            offset: Some(offset),
            message: format!("discard of {len} bytes"),
            kind: IoErrorKind::Target,
        })?;
        for (c, within, n, _) in self.pieces(offset, len)? {
            let mut chunk = self.chunks[c].write().unwrap_or_else(|e| e.into_inner());
            if n == CHUNK {
                *chunk = None;
            } else if let Some(mem) = chunk.as_mut() {
                mem[within..within + n].fill(0);
            }
        }
        Ok(())
    }
    fn try_read(&self, offset: u64, bufs: &mut [&mut [u8]]) -> Option<Result<(), IoError>> {
        Some(self.read(offset, bufs))
    }
    fn try_write(&self, offset: u64, data: &[&[u8]]) -> Option<Result<(), IoError>> {
        Some(self.write(offset, data, false))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_read_back_across_chunks_and_discards_free_whole_chunks() {
        let size = 3 * CHUNK as u64 + 4096;
        let r = RamBackend::new(size);
        let mut buf = vec![1u8; 8192];
        r.read(0, &mut [&mut buf[..]]).unwrap();
        assert!(buf.iter().all(|b| *b == 0), "unwritten reads as zeros");
        assert_eq!(r.allocated(), 0);
        let data: Vec<u8> = (0..3 * CHUNK).map(|i| (i % 251) as u8).collect();
        r.write(4096, &[&data[..]], false).unwrap();
        assert_eq!(r.allocated(), 4 * CHUNK as u64);
        let mut back = vec![0u8; data.len()];
        r.read(4096, &mut [&mut back[..]]).unwrap();
        assert_eq!(back, data);
        // Part of chunk 0, all of chunk 1 (freed), part of chunk 2.
        r.discard(8192, 2 * CHUNK as u64).unwrap();
        assert_eq!(r.allocated(), 3 * CHUNK as u64);
        r.read(4096, &mut [&mut back[..]]).unwrap();
        let hole = 4096..2 * CHUNK + 4096;
        assert_eq!(back[..hole.start], data[..hole.start]);
        assert!(back[hole.clone()].iter().all(|b| *b == 0));
        assert_eq!(back[hole.end..], data[hole.end..]);
        // The last, partial chunk; then beyond the end.
        r.write(size - 512, &[&[9; 512]], true).unwrap();
        assert!(r.write(size - 512, &[&[9; 1024]], false).is_err());
        assert!(r.read(u64::MAX - 10, &mut [&mut [0; 512]]).is_err());
        assert!(r.try_write(0, &[&[1; 512]]).is_some_and(|x| x.is_ok()));
    }
}
