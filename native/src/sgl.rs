//! Scatter Gather Lists (NVMe Base 2.x, 4.3.2), walked as nvme/sgl.py walks them: the
//! same segments, the same status for every malformed list, the walk stopped as soon
//! as the transfer is described.

use std::collections::HashSet;

use crate::memory::{Fallback, GuestMemory};
use crate::prp::{append, CmdError, CmdResult, Segment};
use crate::spec::status;

// SGL Descriptor Type (SGL Identifier bits 7:4), Base Figure 116
const DATA_BLOCK: u8 = 0x0;
const BIT_BUCKET: u8 = 0x1;
const SEGMENT: u8 = 0x2;
const LAST_SEGMENT: u8 = 0x3;
const DESCRIPTOR_SIZE: u64 = 16;
/// descriptors fetched from guest memory at a time (one 4 KiB page)
const CHUNK: u64 = 256;
/// Descriptors examined for one command at most (a loop of segments is caught on its own).
pub const MAX_DESCRIPTORS: i64 = 1 << 16;
const ADDRESS_LIMIT: u128 = 1 << 64;

/// The next segment to walk: (address, length, is a Last Segment).
type Next = (u64, u32, bool);

/// The segments SGL Entry 1 of a command (its DPTR: address, length, identifier)
/// describes for `length` bytes; `to_guest` is a read (bit buckets discard data).
#[allow(clippy::too_many_arguments)]
pub fn sgl_segments(
    memory: &GuestMemory,
    fb: &dyn Fallback,
    addr: u64,
    dlen: u32,
    ident: u8,
    length: u64,
    to_guest: bool,
    dword_granularity: bool,
    segments: &mut Vec<Segment>,
) -> CmdResult<()> {
    segments.clear();
    // One Data Block that describes it all (Linux's choice for a contiguous buffer).
    if ident == 0
        && u64::from(dlen) >= length
        && u128::from(addr) + u128::from(dlen) <= ADDRESS_LIMIT
        && !(dword_granularity && (addr | u64::from(dlen)) & 0x3 != 0)
    {
        if length > 0 {
            segments.push(Segment {
                addr,
                len: length,
                bucket: false,
            });
        }
        return Ok(());
    }
    let mut walk = Walk {
        memory,
        fb,
        remaining: length,
        to_guest,
        dword_granularity,
        budget: MAX_DESCRIPTORS,
        segments,
    };
    walk.run(addr, dlen, ident)
}

struct Walk<'a> {
    memory: &'a GuestMemory,
    fb: &'a dyn Fallback,
    remaining: u64,
    to_guest: bool,
    dword_granularity: bool,
    budget: i64,
    segments: &'a mut Vec<Segment>,
}

impl Walk<'_> {
    fn run(&mut self, addr: u64, dlen: u32, ident: u8) -> CmdResult<()> {
        if self.remaining == 0 {
            return Ok(());
        }
        // SGL Entry 1 is a first segment of one descriptor, which may point onwards.
        let mut following = self.descriptor(addr, dlen, ident, true, false)?;
        // The walk is a function of (segment, bytes left): meeting one again is a loop.
        let mut visited: HashSet<(Next, u64)> = HashSet::new();
        while let Some(next) = following {
            if self.remaining == 0 {
                break;
            }
            if !visited.insert((next, self.remaining)) {
                return Err(CmdError::new(
                    status::INVALID_NUMBER_OF_SGL_DESCRIPTORS,
                    "SGL segments form a loop",
                ));
            }
            let (seg_addr, seg_len, last) = next;
            following = self.segment(seg_addr, u64::from(seg_len) / DESCRIPTOR_SIZE, last)?;
        }
        if self.remaining > 0 {
            return Err(CmdError::new(
                status::DATA_SGL_LENGTH_INVALID,
                format!("SGL is {} bytes short", self.remaining),
            ));
        }
        Ok(())
    }

    /// Walk one SGL segment of `count` descriptors; the next segment if it points onwards.
    fn segment(&mut self, addr: u64, count: u64, last: bool) -> CmdResult<Option<Next>> {
        let mut following = None;
        let mut raw = [0u8; (CHUNK * DESCRIPTOR_SIZE) as usize];
        let mut start = 0;
        while start < count {
            let n = CHUNK.min(count - start);
            self.budget -= n as i64;
            if self.budget < 0 {
                return Err(CmdError::new(
                    status::INVALID_NUMBER_OF_SGL_DESCRIPTORS,
                    format!("more than {MAX_DESCRIPTORS} SGL descriptors"),
                ));
            }
            let bytes = &mut raw[..(n * DESCRIPTOR_SIZE) as usize];
            let at = addr.checked_add(start * DESCRIPTOR_SIZE);
            let read = match at {
                Some(at) => self.memory.read(at, bytes, self.fb),
                None => Err(crate::memory::DmaError("SGL segment past 2^64".into())),
            };
            read.map_err(|e| {
                CmdError::new(status::DATA_TRANSFER_ERROR, format!("SGL segment: {}", e.0))
            })?;
            for i in 0..n {
                let d = &bytes[(16 * i) as usize..(16 * i + 16) as usize];
                let d_addr = u64::from_le_bytes(d[0..8].try_into().unwrap());
                let d_len = u32::from_le_bytes(d[8..12].try_into().unwrap());
                let d_ident = d[15];
                if d_ident == 0
                    && u128::from(d_addr) + u128::from(d_len) <= ADDRESS_LIMIT
                    && !(self.dword_granularity && (d_addr | u64::from(d_len)) & 0x3 != 0)
                {
                    // A valid Data Block, by far the most common descriptor: no checks.
                    following = None;
                    if d_len != 0 {
                        self.take(d_addr, u64::from(d_len), false);
                    }
                } else {
                    let is_last = start + i == count - 1;
                    following = self.descriptor(d_addr, d_len, d_ident, is_last, last)?;
                }
                if self.remaining == 0 {
                    return Ok(None); // described in full: the rest is not used
                }
            }
            start += n;
        }
        Ok(following)
    }

    /// Take one descriptor: data go to the segments; a (Last) Segment descriptor is
    /// returned as the next segment to walk.
    fn descriptor(
        &mut self,
        addr: u64,
        dlen: u32,
        ident: u8,
        is_last_in_segment: bool,
        in_last: bool,
    ) -> CmdResult<Option<Next>> {
        let (dtype, subtype) = (ident >> 4, ident & 0xF);
        let end = u128::from(addr) + u128::from(dlen);
        if subtype != 0 {
            // 1h (Offset) is for NVMe over Fabrics, Ah-Fh transport specific: on PCIe
            // every non-zero Sub Type is reserved (Figure 117).
            return Err(CmdError::new(
                status::SGL_DESCRIPTOR_TYPE_INVALID,
                format!("SGL sub type {subtype:#x}"),
            ));
        }
        match dtype {
            DATA_BLOCK => {
                if self.dword_granularity && (addr | u64::from(dlen)) & 0x3 != 0 {
                    return Err(CmdError::new(
                        status::SGL_DATA_BLOCK_GRANULARITY_INVALID,
                        format!("data block {addr:#x}+{dlen:#x}"),
                    ));
                }
                if end > ADDRESS_LIMIT {
                    return Err(CmdError::new(
                        status::DATA_SGL_LENGTH_INVALID,
                        "data block past 2^64",
                    ));
                }
                if dlen != 0 {
                    self.take(addr, u64::from(dlen), false);
                }
                Ok(None)
            }
            BIT_BUCKET => {
                if dlen != 0 && self.to_guest {
                    // in a source buffer it counts as length 0
                    self.take(0, u64::from(dlen), true);
                }
                Ok(None)
            }
            SEGMENT | LAST_SEGMENT => {
                if in_last {
                    return Err(CmdError::new(
                        status::INVALID_SGL_SEGMENT_DESCRIPTOR,
                        "segment descriptor in the last segment",
                    ));
                }
                if !is_last_in_segment {
                    return Err(CmdError::new(
                        status::INVALID_NUMBER_OF_SGL_DESCRIPTORS,
                        "segment descriptor before the end of its segment",
                    ));
                }
                if dlen == 0 || u64::from(dlen) % DESCRIPTOR_SIZE != 0 || addr & 0x7 != 0 {
                    return Err(CmdError::new(
                        status::INVALID_SGL_SEGMENT_DESCRIPTOR,
                        format!("SGL segment {addr:#x}+{dlen:#x}"),
                    ));
                }
                if end > ADDRESS_LIMIT {
                    return Err(CmdError::new(
                        status::DATA_SGL_LENGTH_INVALID,
                        "SGL segment past 2^64",
                    ));
                }
                Ok(Some((addr, dlen, dtype == LAST_SEGMENT)))
            }
            _ => Err(CmdError::new(
                status::SGL_DESCRIPTOR_TYPE_INVALID,
                format!("SGL descriptor type {dtype:#x}"),
            )),
        }
    }

    fn take(&mut self, addr: u64, dlen: u64, bucket: bool) {
        let n = dlen.min(self.remaining);
        self.remaining -= n;
        if bucket {
            self.segments.push(Segment {
                addr: 0,
                len: n,
                bucket: true,
            });
        } else {
            append(self.segments, addr, n);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::NoFallback;

    fn desc(addr: u64, len: u32, ident: u8) -> [u8; 16] {
        let mut d = [0u8; 16];
        d[0..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[15] = ident;
        d
    }

    #[test]
    fn segments_buckets_and_loops() {
        let base = 0x10_0000u64;
        let mut ram = vec![0u8; 4 * 4096];
        let m = crate::fuzzing::memory_over(base, &mut ram);
        // A last segment of a data block, a bit bucket and another data block.
        for (i, d) in [
            desc(base + 0x2000, 100, 0),
            desc(0, 28, 0x10),
            desc(base + 0x3000, 384, 0),
        ]
        .iter()
        .enumerate()
        {
            // SAFETY(test): ram outlives m; writing our own buffer.
            ram[0x1000 + 16 * i..0x1000 + 16 * i + 16].copy_from_slice(d);
        }
        let mut segs = Vec::new();
        sgl_segments(
            &m,
            &NoFallback,
            base + 0x1000,
            48,
            0x30,
            512,
            true,
            false,
            &mut segs,
        )
        .unwrap();
        assert_eq!(
            segs,
            vec![
                Segment {
                    addr: base + 0x2000,
                    len: 100,
                    bucket: false
                },
                Segment {
                    addr: 0,
                    len: 28,
                    bucket: true
                },
                Segment {
                    addr: base + 0x3000,
                    len: 384,
                    bucket: false
                },
            ]
        );
        // The same list for a write: the bucket counts as length 0, and 28 bytes are missing.
        let err = sgl_segments(
            &m,
            &NoFallback,
            base + 0x1000,
            48,
            0x30,
            512,
            false,
            false,
            &mut segs,
        )
        .unwrap_err();
        assert_eq!(err.status, status::DATA_SGL_LENGTH_INVALID);
        // A segment that points to itself.
        ram[0x1000..0x1010].copy_from_slice(&desc(base + 0x1000, 16, 0x20));
        let err = sgl_segments(
            &m,
            &NoFallback,
            base + 0x1000,
            16,
            0x20,
            512,
            true,
            false,
            &mut segs,
        )
        .unwrap_err();
        assert_eq!(err.status, status::INVALID_NUMBER_OF_SGL_DESCRIPTORS);
    }
}
