//! I/O submission and completion queues (NVMe Base 3.3) with their doorbells: trapped
//! (the value arrives over the socket), shadow (Doorbell Buffer Config: the guest
//! stores it in its own memory, and rings the real one when our EventIdx asks), or
//! mapped (BAR0's doorbell page lives in memory the client maps: never trapped).
//! nvme/queues.py is the same in Python.

use std::sync::atomic::{fence, Ordering};

use crate::memory::{load_word, DmaError, Fallback, GuestMemory, View};
use crate::spec::{Sqe, CQE_SIZE, SQE_SIZE};

/// Where a queue's doorbell value is found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Doorbell {
    /// only in the value a trapped write brought
    Trapped,
    /// the guest's shadow doorbell slot and our EventIdx slot (guest addresses)
    Shadow { shadow: u64, eventidx: u64 },
    /// word `index` of the mapped doorbell page
    Mapped { index: usize },
}

/// The mapped doorbell page: BAR0 1000h onwards, as 32-bit words, in memory the Python
/// side owns for as long as the plane lives.
#[derive(Clone, Copy)]
pub struct DoorbellPage {
    pub base: *mut u8,
    pub words: usize,
}

// SAFETY: the page is an mmap of a memfd that outlives the plane (virtual_controller.py
// unmaps it only after the plane has stopped); every access is an atomic word access,
// so sharing it between threads is as sound as sharing an array of AtomicU32.
unsafe impl Send for DoorbellPage {}
unsafe impl Sync for DoorbellPage {}

impl DoorbellPage {
    pub fn load(&self, index: usize) -> u32 {
        assert!(index < self.words);
        // SAFETY: in bounds (checked), 4-byte aligned (a page), alive (see above).
        unsafe { load_word(self.base, index) }
    }

    pub fn store(&self, index: usize, value: u32) {
        assert!(index < self.words);
        // SAFETY: as in load().
        unsafe { crate::memory::store_word(self.base, index, value, Ordering::Release) }
    }
}

/// A queue's memory: resolved to a host address once per memory table generation
/// (Python's cached view), or reached through copies.
#[derive(Clone, Copy, Debug, Default)]
pub struct Slots {
    pub base: u64,
    pub bytes: u64,
    generation: u64,
    host: Option<*mut u8>,
}

// SAFETY: a cached host address, valid for the generation it was resolved in (memory.rs).
unsafe impl Send for Slots {}

impl Slots {
    pub fn new(
        memory: &GuestMemory,
        fb: &dyn Fallback,
        base: u64,
        bytes: u64,
    ) -> Result<Slots, DmaError> {
        let host = match memory.view(base, bytes, true, fb)? {
            View::Mapped(p) => Some(p),
            View::Copied => None,
        };
        Ok(Slots {
            base,
            bytes,
            generation: memory.generation,
            host,
        })
    }

    /// The host address of the queue, if it is mapped in the current table.
    pub fn host(&mut self, memory: &GuestMemory, fb: &dyn Fallback) -> Option<*mut u8> {
        if self.generation != memory.generation {
            self.generation = memory.generation;
            self.host = match memory.view(self.base, self.bytes, true, fb) {
                Ok(View::Mapped(p)) => Some(p),
                _ => None, // reads and writes will report it
            };
        }
        self.host
    }
}

pub struct SubmissionQueue {
    pub qid: u16,
    pub size: u32,
    pub cqid: u16,
    pub head: u32,
    pub tail: u32,
    pub doorbell: Doorbell,
    pub slots: Slots,
    /// the tail at which the head entry, the first of a fused operation, waits for its
    /// second: the plane leaves it in the queue until then
    pub fused_wait: Option<u32>,
}

impl SubmissionQueue {
    /// Take the tail from the shadow doorbell or the mapped page, if there is one.
    pub fn refresh_tail(
        &mut self,
        memory: &GuestMemory,
        fb: &dyn Fallback,
        page: Option<DoorbellPage>,
    ) -> Result<(), DmaError> {
        let value = match self.doorbell {
            Doorbell::Trapped => return Ok(()),
            Doorbell::Shadow { shadow, .. } => memory.load_u32(shadow, fb)?,
            Doorbell::Mapped { index } => page.map_or(0, |p| p.load(index)),
        };
        if value < self.size {
            self.tail = value;
        }
        Ok(())
    }

    /// A tail the guest wrote to the doorbell register (it trapped). With shadow
    /// doorbells the shadow is the truth and the write only says "look" (the Python
    /// plane does the same): a stale or different rung value is not taken.
    pub fn take_rung_tail(&mut self, value: u32) {
        if !matches!(self.doorbell, Doorbell::Shadow { .. }) {
            self.tail = value;
        }
    }

    /// The entry at the head, consumed.
    pub fn fetch(&mut self, memory: &GuestMemory, fb: &dyn Fallback) -> Result<Sqe, DmaError> {
        let sqe = self.peek(memory, fb, self.head)?;
        self.head = self.next(self.head);
        Ok(sqe)
    }

    /// The entry in `slot` (< size), not consumed.
    pub fn peek(
        &mut self,
        memory: &GuestMemory,
        fb: &dyn Fallback,
        slot: u32,
    ) -> Result<Sqe, DmaError> {
        let offset = u64::from(slot.min(self.size - 1)) * SQE_SIZE;
        let mut raw = [0u8; 64];
        match self.slots.host(memory, fb) {
            // SAFETY: the queue's slots are mapped at `host` for this generation, and
            // slot < size keeps the entry inside them.
            Some(host) => unsafe {
                crate::memory::copy_from_guest(host.add(offset as usize), &mut raw)
            },
            None => memory.read(self.slots.base + offset, &mut raw, fb)?,
        }
        Ok(Sqe::from_bytes(&raw))
    }

    /// The slot after `slot`, wrapping at the end of the queue.
    pub fn next(&self, slot: u32) -> u32 {
        if slot + 1 >= self.size {
            0
        } else {
            slot + 1
        }
    }

    /// Entries wait that the plane can take: not only the first of a fused operation
    /// whose second has not come.
    pub fn has_work(&self) -> bool {
        self.head != self.tail && Some(self.tail) != self.fused_wait
    }

    /// Ask the guest to ring on its next submission (before parking); true if commands
    /// are waiting: submitted before the guest could see the request, they would ring
    /// nothing. Store EventIdx, a full fence, load the tail again: the guest does the
    /// mirror image (store the tail, fence, load EventIdx), so one side sees the other.
    pub fn enable_notification(
        &mut self,
        memory: &GuestMemory,
        fb: &dyn Fallback,
    ) -> Result<bool, DmaError> {
        if let Doorbell::Shadow { eventidx, .. } = self.doorbell {
            memory.store_u32(eventidx, self.tail & 0xFFFF, fb)?; // the next new tail rings
            fence(Ordering::SeqCst);
            self.refresh_tail(memory, fb, None)?;
        }
        Ok(self.has_work())
    }

    /// A polling thread sees new entries by itself: EventIdx one behind the tail lets
    /// the guest skip the doorbell.
    pub fn suppress_notification(
        &self,
        memory: &GuestMemory,
        fb: &dyn Fallback,
    ) -> Result<(), DmaError> {
        if let Doorbell::Shadow { eventidx, .. } = self.doorbell {
            memory.store_u32(eventidx, self.tail.wrapping_sub(1) & 0xFFFF, fb)?;
        }
        Ok(())
    }
}

pub struct CompletionQueue {
    pub qid: u16,
    pub size: u32,
    pub head: u32,
    pub tail: u32,
    pub phase: u32,
    pub vector: u16,
    pub interrupts_enabled: bool,
    pub doorbell: Doorbell,
    pub slots: Slots,
    /// slots promised to commands in flight: never given to others
    pub reserved: u32,
    /// completions posted since the last interrupt
    pub unsignalled: u32,
}

impl CompletionQueue {
    pub fn refresh_head(
        &mut self,
        memory: &GuestMemory,
        fb: &dyn Fallback,
        page: Option<DoorbellPage>,
    ) -> Result<(), DmaError> {
        let value = match self.doorbell {
            Doorbell::Trapped => return Ok(()),
            Doorbell::Shadow { shadow, .. } => memory.load_u32(shadow, fb)?,
            Doorbell::Mapped { index } => page.map_or(0, |p| p.load(index)),
        };
        if value < self.size {
            self.head = value;
        }
        Ok(())
    }

    fn used(&self) -> i64 {
        i64::from((self.tail + self.size - self.head) % self.size)
    }

    /// No room for one more completion beside those posted and those reserved.
    pub fn is_full(
        &mut self,
        memory: &GuestMemory,
        fb: &dyn Fallback,
        page: Option<DoorbellPage>,
    ) -> Result<bool, DmaError> {
        let limit = i64::from(self.size) - 1 - i64::from(self.reserved);
        if self.used() < limit {
            return Ok(false);
        }
        self.refresh_head(memory, fb, page)?;
        Ok(self.used() >= limit)
    }

    /// A CQ head doorbell write: false for a value past the tail (Base 3.3.1.2).
    pub fn set_head(&mut self, head: u32) -> bool {
        if head >= self.size {
            return false;
        }
        let consumed = (head + self.size - self.head) % self.size;
        if consumed as i64 > self.used() {
            return false;
        }
        self.head = head;
        true
    }

    /// Write one completion (the caller checked is_full()): DW0-DW2, then DW3 with the
    /// phase tag in one store, last (the guest polls it).
    #[allow(clippy::too_many_arguments)]
    pub fn post(
        &mut self,
        memory: &GuestMemory,
        fb: &dyn Fallback,
        dw0: u32,
        sq_head: u32,
        sqid: u16,
        cid: u16,
        status: u16,
    ) -> Result<(), DmaError> {
        let dw2 = sq_head | (u32::from(sqid) << 16);
        let dw3 = u32::from(cid) | (self.phase << 16) | (u32::from(status) << 17);
        let offset = u64::from(self.tail) * CQE_SIZE;
        match self.slots.host(memory, fb) {
            Some(host) => {
                // SAFETY: the CQ's slots are mapped writable at `host` for this
                // generation; tail < size keeps the entry inside; aligned (16-byte
                // entries in a page-aligned queue).
                unsafe {
                    let entry = host.add(offset as usize);
                    crate::memory::store_word(entry, 0, dw0, Ordering::Relaxed);
                    crate::memory::store_word(entry, 1, 0, Ordering::Relaxed);
                    crate::memory::store_word(entry, 2, dw2, Ordering::Relaxed);
                    crate::memory::store_word(entry, 3, dw3, Ordering::Release);
                }
            }
            None => {
                let mut head = [0u8; 12];
                head[0..4].copy_from_slice(&dw0.to_le_bytes());
                head[8..12].copy_from_slice(&dw2.to_le_bytes());
                memory.write(self.slots.base + offset, &head, fb)?;
                memory.write(self.slots.base + offset + 12, &dw3.to_le_bytes(), fb)?;
            }
        }
        self.tail += 1;
        if self.tail == self.size {
            self.tail = 0;
            self.phase ^= 1;
        }
        Ok(())
    }
}
