//! Scattered caller buffers for [`crate::Cache::write_vectored`] and
//! [`crate::Cache::read_vectored`]: a write's data or a read's destination as a list of
//! slices in order (a TCMU command's iovecs over the ring's data area), so the engine
//! copies between them and its segment buffers once, with no contiguous staging copy.
//!
//! Positions are byte offsets into the concatenation of the slices; a 4 KiB line (or a
//! 512-byte sector) may span several slices.

/// A run of bytes in a caller's scattered source buffers.
#[derive(Clone, Copy)]
pub(crate) struct Gather<'a> {
    parts: &'a [&'a [u8]],
    /// Bytes of `parts[0]` before the run.
    skip: usize,
    len: usize,
}

impl<'a> Gather<'a> {
    /// The whole of `parts`.
    pub(crate) fn new(parts: &'a [&'a [u8]]) -> Gather<'a> {
        Gather {
            parts,
            skip: 0,
            len: parts.iter().map(|p| p.len()).sum(),
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// The first `n` bytes (at most [`Gather::len`]) and the rest.
    pub(crate) fn split_at(self, n: usize) -> (Gather<'a>, Gather<'a>) {
        let n = n.min(self.len);
        let head = Gather { len: n, ..self };
        // Walk to the slice holding byte `n`.
        let (mut parts, mut at) = (self.parts, self.skip + n);
        while let Some((first, rest)) = parts.split_first() {
            if at < first.len() || rest.is_empty() {
                break;
            }
            at -= first.len();
            parts = rest;
        }
        let tail = Gather {
            parts,
            skip: at,
            len: self.len - n,
        };
        (head, tail)
    }

    /// The crc32c of the run.
    pub(crate) fn crc(&self) -> u32 {
        let (mut skip, mut left, mut crc) = (self.skip, self.len, 0);
        for p in self.parts {
            if left == 0 {
                break;
            }
            let src = p.get(skip..).unwrap_or_default();
            skip = 0;
            let n = src.len().min(left);
            crc = crc32c::crc32c_append(crc, &src[..n]);
            left -= n;
        }
        crc
    }

    /// Copies the run into `dst`, which must be exactly [`Gather::len`] bytes.
    pub(crate) fn copy_to(&self, dst: &mut [u8]) {
        debug_assert_eq!(dst.len(), self.len);
        let mut skip = self.skip;
        let mut done = 0;
        for p in self.parts {
            if done == dst.len() {
                break;
            }
            let src = p.get(skip..).unwrap_or_default();
            skip = 0;
            let n = src.len().min(dst.len() - done);
            dst[done..done + n].copy_from_slice(&src[..n]);
            done += n;
        }
    }
}

/// A caller's scattered destination buffers, addressed by position.
pub(crate) struct Scatter<'a, 'b> {
    parts: &'a mut [&'b mut [u8]],
    /// Position of the start of each part, and the total at the end.
    starts: Vec<usize>,
}

impl<'a, 'b> Scatter<'a, 'b> {
    pub(crate) fn new(parts: &'a mut [&'b mut [u8]]) -> Scatter<'a, 'b> {
        let mut starts = Vec::with_capacity(parts.len() + 1);
        let mut at = 0;
        for p in parts.iter() {
            starts.push(at);
            at += p.len();
        }
        starts.push(at);
        Scatter { parts, starts }
    }

    pub(crate) fn len(&self) -> usize {
        *self.starts.last().expect("one entry at least")
    }

    /// The part holding position `pos` (the last of several starting there, skipping
    /// empty ones).
    fn part_of(&self, pos: usize) -> usize {
        self.starts.partition_point(|&s| s <= pos).saturating_sub(1)
    }

    /// Calls `f(position in the range, slice)` for each piece of `[pos, pos + len)`, in
    /// order.
    pub(crate) fn for_each(&mut self, pos: usize, len: usize, mut f: impl FnMut(usize, &mut [u8])) {
        let end = pos + len;
        let mut i = self.part_of(pos);
        let mut at = pos;
        while at < end && i < self.parts.len() {
            let s = self.starts[i];
            let p = &mut self.parts[i];
            let a = at - s;
            let b = (end - s).min(p.len());
            if a < b {
                f(at - pos, &mut p[a..b]);
                at = s + b;
            }
            i += 1;
        }
    }

    /// Copies `src` to `[pos, pos + src.len())`.
    pub(crate) fn copy_from(&mut self, pos: usize, src: &[u8]) {
        self.for_each(pos, src.len(), |o, d| {
            d.copy_from_slice(&src[o..o + d.len()])
        });
    }

    /// The crc32c of `[pos, pos + len)`.
    pub(crate) fn crc(&mut self, pos: usize, len: usize) -> u32 {
        let mut crc = 0;
        self.for_each(pos, len, |_, d| crc = crc32c::crc32c_append(crc, d));
        crc
    }

    /// Zeroes `[pos, pos + len)`.
    pub(crate) fn zero(&mut self, pos: usize, len: usize) {
        self.for_each(pos, len, |_, d| d.fill(0));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_gather_split_anywhere_copies_the_same_bytes() {
        let data: Vec<u8> = (0..100u8).collect();
        let parts: Vec<&[u8]> = vec![&data[..7], &data[7..7], &data[7..50], &data[50..]];
        for cut in 0..=100 {
            let (h, t) = Gather::new(&parts).split_at(cut);
            let mut a = vec![0u8; h.len()];
            h.copy_to(&mut a);
            let mut b = vec![0u8; t.len()];
            t.copy_to(&mut b);
            assert_eq!(a, &data[..cut]);
            assert_eq!(b, &data[cut..]);
            // Split again inside the tail.
            let (m, r) = t.split_at(3);
            let mut c = vec![0u8; m.len()];
            m.copy_to(&mut c);
            let mut d = vec![0u8; r.len()];
            r.copy_to(&mut d);
            assert_eq!(c, &data[cut..(cut + 3).min(100)]);
            assert_eq!(d, &data[(cut + 3).min(100)..]);
        }
    }

    #[test]
    fn crcs_across_parts_equal_the_crc_of_the_bytes() {
        let mut data: Vec<u8> = (0..100u8).map(|b| b.wrapping_mul(37)).collect();
        let want = |a: usize, b: usize, d: &[u8]| crc32c::crc32c(&d[a..b]);
        let expect: Vec<u32> = (0..=100).map(|cut| want(cut, 100, &data)).collect();
        let parts: Vec<&[u8]> = vec![&data[..7], &data[7..7], &data[7..50], &data[50..]];
        for (cut, &want) in expect.iter().enumerate() {
            let (_, t) = Gather::new(&parts).split_at(cut);
            assert_eq!(t.crc(), want);
        }
        let (a, rest) = data.split_at_mut(7);
        let (b, c) = rest.split_at_mut(43);
        let mut parts: Vec<&mut [u8]> = vec![a, b, c];
        let mut s = Scatter::new(&mut parts);
        for (cut, &want) in expect.iter().enumerate() {
            assert_eq!(s.crc(cut, 100 - cut), want);
        }
    }

    #[test]
    fn a_scatter_writes_ranges_across_parts() {
        let mut buf = vec![0u8; 20];
        let (a, rest) = buf.split_at_mut(5);
        let (b, c) = rest.split_at_mut(0);
        let (c, d) = c.split_at_mut(9);
        let mut parts: Vec<&mut [u8]> = vec![a, b, c, d];
        let mut s = Scatter::new(&mut parts);
        assert_eq!(s.len(), 20);
        s.copy_from(3, &[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]);
        s.zero(4, 2);
        drop(parts);
        assert_eq!(
            buf,
            [0, 0, 0, 1, 0, 0, 4, 5, 6, 7, 8, 9, 10, 11, 12, 0, 0, 0, 0, 0]
        );
    }
}
