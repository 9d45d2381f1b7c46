//! Physical Region Page entries and lists (NVMe Base 4.1.1): the guest's scatter list,
//! walked as nvme/prp.py walks it, with the same checks and statuses.

use crate::memory::{DmaError, Fallback, GuestMemory};
use crate::spec::{status, PAGE_MASK, PAGE_SIZE};

/// A piece of a data buffer: a guest range, or (SGLs) bytes a read discards.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    pub addr: u64,
    pub len: u64,
    /// a Bit Bucket: nothing to move (read) or nothing at all (write)
    pub bucket: bool,
}

/// A command that fails: the status to post (DNR by spec::with_dnr unless `dnr` says).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CmdError {
    pub status: u16,
    pub dnr: Option<bool>,
    /// the first LBA that failed, for the Error Information log
    pub lba: u64,
    pub message: String,
}

impl CmdError {
    pub fn new(status: u16, message: impl Into<String>) -> CmdError {
        CmdError {
            status,
            dnr: None,
            lba: 0,
            message: message.into(),
        }
    }

    pub fn transfer(err: DmaError) -> CmdError {
        CmdError::new(status::DATA_TRANSFER_ERROR, err.0)
    }
}

pub type CmdResult<T> = Result<T, CmdError>;

/// Append a guest range, merged with the last one when physically adjacent.
pub fn append(segments: &mut Vec<Segment>, addr: u64, len: u64) {
    if let Some(last) = segments.last_mut() {
        if !last.bucket && u128::from(last.addr) + u128::from(last.len) == u128::from(addr) {
            last.len += len;
            return;
        }
    }
    segments.push(Segment {
        addr,
        len,
        bucket: false,
    });
}

/// The segments PRP1/PRP2 describe for a transfer of `length` bytes (nvme/prp.py
/// prp_segments): PRP Offset Invalid for misaligned entries, Data Transfer Error for a
/// PRP list in unreachable memory.
pub fn prp_segments(
    memory: &GuestMemory,
    fb: &dyn Fallback,
    prp1: u64,
    prp2: u64,
    length: u64,
    segments: &mut Vec<Segment>,
) -> CmdResult<()> {
    segments.clear();
    if length == 0 {
        return Ok(());
    }
    if prp1 & 0x3 != 0 {
        return Err(CmdError::new(
            status::PRP_OFFSET_INVALID,
            "PRP1 not dword aligned",
        ));
    }
    let first = length.min(PAGE_SIZE - (prp1 & PAGE_MASK));
    segments.push(Segment {
        addr: prp1,
        len: first,
        bucket: false,
    });
    let mut remaining = length - first;
    if remaining == 0 {
        return Ok(());
    }
    if remaining <= PAGE_SIZE {
        if prp2 & PAGE_MASK != 0 {
            return Err(CmdError::new(
                status::PRP_OFFSET_INVALID,
                "PRP2 entry has an offset",
            ));
        }
        append(segments, prp2, remaining);
        return Ok(());
    }
    if prp2 & 0x7 != 0 {
        return Err(CmdError::new(
            status::PRP_OFFSET_INVALID,
            "PRP list pointer not qword aligned",
        ));
    }
    let mut list_addr = prp2;
    let mut raw = [0u8; PAGE_SIZE as usize];
    while remaining > 0 {
        let pages_left = remaining.div_ceil(PAGE_SIZE);
        let slots = (PAGE_SIZE - (list_addr & PAGE_MASK)) / 8; // to the end of this page
        let chained = pages_left > slots; // the last slot then points to the next list page
        let count = if chained { slots - 1 } else { pages_left };
        let entries = if chained { slots } else { count } as usize;
        let bytes = &mut raw[..entries * 8];
        memory.read(list_addr, bytes, fb).map_err(|e| {
            CmdError::new(status::DATA_TRANSFER_ERROR, format!("PRP list: {}", e.0))
        })?;
        let entry = |i: usize| u64::from_le_bytes(bytes[8 * i..8 * i + 8].try_into().unwrap());
        for i in 0..count as usize {
            let page = entry(i);
            if page & PAGE_MASK != 0 {
                return Err(CmdError::new(
                    status::PRP_OFFSET_INVALID,
                    "PRP list entry has an offset",
                ));
            }
            let chunk = PAGE_SIZE.min(remaining);
            append(segments, page, chunk);
            remaining -= chunk;
        }
        if chained {
            list_addr = entry(entries - 1);
            if list_addr & PAGE_MASK != 0 {
                return Err(CmdError::new(
                    status::PRP_OFFSET_INVALID,
                    "chained PRP list has an offset",
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::NoFallback;

    fn memory(ram: &mut [u8]) -> GuestMemory {
        crate::fuzzing::memory_over(0x10_0000, ram)
    }

    #[test]
    fn one_page_two_pages_and_a_list() {
        let mut ram = vec![0u8; 16 * 4096];
        let base = 0x10_0000u64;
        let list = base + 4096;
        for (i, page) in [base + 0x3000, base + 0x4000, base + 0x8000]
            .iter()
            .enumerate()
        {
            ram[4096 + 8 * i..4096 + 8 * i + 8].copy_from_slice(&page.to_le_bytes());
        }
        let m = memory(&mut ram);
        let mut segs = Vec::new();
        prp_segments(&m, &NoFallback, base + 512, 0, 512, &mut segs).unwrap();
        assert_eq!(
            segs,
            vec![Segment {
                addr: base + 512,
                len: 512,
                bucket: false
            }]
        );
        prp_segments(
            &m,
            &NoFallback,
            base + 0x2000,
            base + 0x3000,
            8192,
            &mut segs,
        )
        .unwrap();
        assert_eq!(
            segs,
            vec![Segment {
                addr: base + 0x2000,
                len: 8192,
                bucket: false
            }]
        );
        prp_segments(&m, &NoFallback, base + 0x2000, list, 4 * 4096, &mut segs).unwrap();
        assert_eq!(
            segs,
            vec![
                Segment {
                    addr: base + 0x2000,
                    len: 3 * 4096,
                    bucket: false
                },
                Segment {
                    addr: base + 0x8000,
                    len: 4096,
                    bucket: false
                },
            ]
        );
        let err = prp_segments(&m, &NoFallback, base + 1, 0, 512, &mut segs).unwrap_err();
        assert_eq!(err.status, status::PRP_OFFSET_INVALID);
        let err =
            prp_segments(&m, &NoFallback, base, 0x7000_0000, 4 * 4096, &mut segs).unwrap_err();
        assert_eq!(err.status, status::DATA_TRANSFER_ERROR);
    }
}
