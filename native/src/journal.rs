//! The I/O journal (handover/journal.py has the layout and the argument): where every
//! queue stands and which commands are in flight, in shared memory that outlives the
//! process, so that a successor can go on after a crash. Stores are ordered so that a
//! crash between any two of them is recoverable: fetch sets the command's bit before
//! the new head; post clears it after the completion entry and before the new tail.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

const POSITIONS: usize = 64;
const CIDS: usize = 1 << 16;
const BITMAP_BYTES: usize = CIDS / 8;
const PHASE: u32 = 1 << 31;

/// The journal's mapping: `queues` queues' positions and in-flight bitmaps.
#[derive(Clone, Copy)]
pub struct Journal {
    base: *mut u8,
    len: usize,
    queues: usize,
}

// SAFETY: the mapping is a memfd's that the Python side keeps mapped for as long as the
// plane lives (like the doorbell page); every access is an atomic word access.
unsafe impl Send for Journal {}
unsafe impl Sync for Journal {}

fn bitmaps_offset(queues: usize) -> usize {
    (POSITIONS + 16 * queues).div_ceil(4096) * 4096
}

impl Journal {
    /// `base`/`len`: the mapping (journal_size(queues) bytes, page aligned). None if it
    /// is too short for `queues` queues.
    pub fn new(base: *mut u8, len: usize, queues: usize) -> Option<Journal> {
        (base as usize % 8 == 0 && len >= bitmaps_offset(queues) + queues * BITMAP_BYTES)
            .then_some(Journal { base, len, queues })
    }

    fn word32(&self, offset: usize) -> &AtomicU32 {
        assert!(offset + 4 <= self.len && offset % 4 == 0);
        // SAFETY: in bounds and aligned (checked), alive (see the Send impl).
        unsafe { &*(self.base.add(offset) as *const AtomicU32) }
    }

    fn word64(&self, offset: usize) -> &AtomicU64 {
        assert!(offset + 8 <= self.len && offset % 8 == 0);
        // SAFETY: as in word32.
        unsafe { &*(self.base.add(offset) as *const AtomicU64) }
    }

    fn bit(&self, qid: u16, cid: u16) -> (&AtomicU64, u64) {
        let q = usize::from(qid);
        assert!(q < self.queues);
        let offset = bitmaps_offset(self.queues) + q * BITMAP_BYTES + usize::from(cid >> 6) * 8;
        (self.word64(offset), 1u64 << (cid & 63))
    }

    /// SQ `qid` consumed command `cid`; its head is now `head`.
    pub fn fetched(&self, qid: u16, head: u32, cid: u16) {
        let (word, mask) = self.bit(qid, cid);
        word.fetch_or(mask, Ordering::SeqCst);
        self.word32(POSITIONS + 16 * usize::from(qid))
            .store(head, Ordering::SeqCst);
    }

    /// Command `cid` of SQ `sqid` was posted to CQ `cqid`, whose tail and phase are now
    /// `tail` and `phase`.
    pub fn posted(&self, sqid: u16, cid: u16, cqid: u16, tail: u32, phase: u32) {
        let (word, mask) = self.bit(sqid, cid);
        word.fetch_and(!mask, Ordering::SeqCst);
        let value = tail | if phase != 0 { PHASE } else { 0 };
        self.word32(POSITIONS + 16 * usize::from(cqid) + 4)
            .store(value, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fetch_and_post_leave_the_positions_and_bits_python_reads() {
        let queues = 3;
        let mut mem = vec![0u64; (bitmaps_offset(queues) + queues * BITMAP_BYTES) / 8];
        let j = Journal::new(mem.as_mut_ptr().cast(), mem.len() * 8, queues).unwrap();
        j.fetched(1, 5, 700);
        j.fetched(1, 6, 3);
        j.posted(1, 700, 2, 9, 0);
        let bytes: &[u8] =
            // SAFETY: the vector's own bytes, read after the writes above.
            unsafe { std::slice::from_raw_parts(mem.as_ptr().cast(), mem.len() * 8) };
        let u32_at = |o: usize| u32::from_le_bytes(bytes[o..o + 4].try_into().unwrap());
        assert_eq!(u32_at(POSITIONS + 16), 6);
        assert_eq!(u32_at(POSITIONS + 16 * 2 + 4), 9);
        let bitmap = bitmaps_offset(queues) + BITMAP_BYTES;
        let set: Vec<usize> = (0..CIDS)
            .filter(|c| bytes[bitmap + c / 8] & (1 << (c % 8)) != 0)
            .collect();
        assert_eq!(set, vec![3]);
        assert!(Journal::new(mem.as_mut_ptr().cast(), 64, queues).is_none());
    }
}
