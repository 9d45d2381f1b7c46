//! Guest memory, as the transport mapped it (DMA_MAP): the one place where the data
//! plane touches memory through raw pointers.
//!
//! The table lists the client's regions; those that came with a file descriptor were
//! mmap'd by the Python side (vfio_user/memory.py) and are reached here in place. A
//! range that does not lie inside one such region (memory reachable only by DMA
//! messages, a range spanning two regions, a gap) goes to the `Fallback`: the Python
//! GuestMemory itself, which answers exactly as the Python data plane sees memory.
//!
//! Why the raw pointers are sound: a region's mapping is created before the table that
//! names it is handed over (`set`), and it is unmapped only after a newer table without
//! it has replaced this one while the data plane was paused with nothing in flight
//! (the transport's quiesce, DataPlane.memory_changed). Between passes the thread holds
//! no pointer; within a pass it holds the state lock that `set` needs. The guest writes
//! this memory concurrently: every access is volatile (or atomic, for the words the
//! guest polls), never through a Rust reference to the bytes.

use std::sync::atomic::{AtomicU32, Ordering};

/// A guest range that cannot be reached (DmaError in Python): the command gets Data
/// Transfer Error, queue memory makes the controller fatal.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DmaError(pub String);

/// What to do with a range the table cannot reach in place.
pub trait Fallback {
    /// Python's `GuestMemory.view`: Err for a gap or a missing permission; Ok(()) when
    /// the range is reachable, by copies only.
    fn check(&self, addr: u64, len: u64, write: bool) -> Result<(), DmaError>;
    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), DmaError>;
    fn write(&self, addr: u64, data: &[u8]) -> Result<(), DmaError>;
}

/// One region of the client's DMA table.
#[derive(Clone, Copy, Debug)]
pub struct Region {
    pub iova: u64,
    pub len: u64,
    /// The host address of `iova` in this process, or 0: reachable by messages only.
    pub host: usize,
    pub readable: bool,
    pub writable: bool,
}

/// How a range is reached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum View {
    /// In place, at this host address, for the whole range.
    Mapped(*mut u8),
    /// Only through copies (the fallback).
    Copied,
}

/// The client's regions, sorted by IOVA, and a generation that changes with them.
#[derive(Default)]
pub struct GuestMemory {
    regions: Vec<Region>,
    pub generation: u64,
}

// SAFETY: the table holds host addresses, not references; see the module doc for who
// keeps the mappings alive. It moves between the Python thread that sets it and the
// data plane thread (under the state lock).
unsafe impl Send for GuestMemory {}

impl GuestMemory {
    /// Replace the table (the caller holds the state lock: no pass is running).
    pub fn set(&mut self, mut regions: Vec<Region>) {
        regions.sort_by_key(|r| r.iova);
        self.regions = regions;
        self.generation += 1;
    }

    /// Add one region (DMA_MAP): O(log n) to find its place, no copy of the others'
    /// descriptions from Python.
    pub fn insert(&mut self, region: Region) {
        let at = self.regions.partition_point(|r| r.iova < region.iova);
        self.regions.insert(at, region);
        self.generation += 1;
    }

    /// Remove the regions that start at these guest addresses (DMA_UNMAP; the caller
    /// holds the state lock, the plane is paused).
    pub fn remove(&mut self, iovas: &[u64]) {
        for &iova in iovas {
            let at = self.regions.partition_point(|r| r.iova < iova);
            if self.regions.get(at).is_some_and(|r| r.iova == iova) {
                self.regions.remove(at);
            }
        }
        self.generation += 1;
    }

    pub fn regions(&self) -> &[Region] {
        &self.regions
    }

    /// The region that holds all of [addr, addr + len), if one does.
    fn containing(&self, addr: u64, len: u64) -> Option<&Region> {
        let i = self.regions.partition_point(|r| r.iova <= addr);
        if i == 0 || len == 0 {
            return None;
        }
        let region = &self.regions[i - 1];
        let offset = addr - region.iova;
        let end = u128::from(offset) + u128::from(len);
        (end <= u128::from(region.len)).then_some(region)
    }

    /// How [addr, addr + len) is reached with `write` (guest memory written) or read
    /// access: as Python's GuestMemory.view decides, with the same errors.
    pub fn view(
        &self,
        addr: u64,
        len: u64,
        write: bool,
        fb: &dyn Fallback,
    ) -> Result<View, DmaError> {
        if let Some(region) = self.containing(addr, len) {
            let allowed = if write {
                region.writable
            } else {
                region.readable
            };
            if !allowed {
                return Err(denied(addr, len, write));
            }
            if region.host != 0 {
                let offset = (addr - region.iova) as usize;
                return Ok(View::Mapped((region.host + offset) as *mut u8));
            }
            return Ok(View::Copied);
        }
        fb.check(addr, len, write)?;
        Ok(View::Copied)
    }

    /// The host address of [addr, addr + len) if it is mapped in place with `write`
    /// (or read) access; None for anything else (the caller goes the slow way).
    pub fn mapped(&self, addr: u64, len: u64, write: bool) -> Option<*mut u8> {
        let region = self.containing(addr, len)?;
        let allowed = if write {
            region.writable
        } else {
            region.readable
        };
        if !allowed || region.host == 0 {
            return None;
        }
        Some((region.host + (addr - region.iova) as usize) as *mut u8)
    }

    /// Copy guest memory out.
    pub fn read(&self, addr: u64, buf: &mut [u8], fb: &dyn Fallback) -> Result<(), DmaError> {
        match self.mapped(addr, buf.len() as u64, false) {
            Some(ptr) => {
                // SAFETY: the table maps [addr, addr + len) readable at ptr (see the
                // module doc); volatile: the guest may be writing it.
                unsafe { copy_from_guest(ptr, buf) };
                Ok(())
            }
            None => fb.read(addr, buf),
        }
    }

    /// Copy into guest memory.
    pub fn write(&self, addr: u64, data: &[u8], fb: &dyn Fallback) -> Result<(), DmaError> {
        match self.mapped(addr, data.len() as u64, true) {
            Some(ptr) => {
                // SAFETY: the table maps [addr, addr + len) writable at ptr.
                unsafe { copy_to_guest(data, ptr) };
                Ok(())
            }
            None => fb.write(addr, data),
        }
    }

    /// One 32-bit word, loaded whole (a doorbell the guest stores while we poll).
    pub fn load_u32(&self, addr: u64, fb: &dyn Fallback) -> Result<u32, DmaError> {
        match self
            .mapped(addr, 4, true)
            .filter(|p| (*p as usize) % 4 == 0)
        {
            // SAFETY: mapped, writable (so readable as Python's view(..., True) asks),
            // 4-byte aligned; the guest writes it concurrently, so an atomic load.
            Some(ptr) => Ok(unsafe { AtomicU32::from_ptr(ptr.cast()) }.load(Ordering::Acquire)),
            None => {
                let mut raw = [0u8; 4];
                fb.read(addr, &mut raw)?;
                Ok(u32::from_le_bytes(raw))
            }
        }
    }

    /// Store one 32-bit word in one store (EventIdx, a shadow doorbell).
    pub fn store_u32(&self, addr: u64, value: u32, fb: &dyn Fallback) -> Result<(), DmaError> {
        match self
            .mapped(addr, 4, true)
            .filter(|p| (*p as usize) % 4 == 0)
        {
            Some(ptr) => {
                // SAFETY: mapped writable and aligned; atomic, so the guest polling it
                // sees the old or the new value, never a torn one.
                unsafe { AtomicU32::from_ptr(ptr.cast()) }.store(value, Ordering::Release);
                Ok(())
            }
            None => fb.write(addr, &value.to_le_bytes()),
        }
    }
}

/// Copy `buf.len()` bytes of guest memory at `src` into `buf`.
///
/// # Safety
/// `src` must be valid for reads of `buf.len()` bytes.
pub unsafe fn copy_from_guest(src: *const u8, buf: &mut [u8]) {
    // SAFETY: the caller's promise; byte-wise volatile keeps the compiler from assuming
    // the bytes stay put (the guest may be writing them).
    for (i, b) in buf.iter_mut().enumerate() {
        *b = unsafe { src.add(i).read_volatile() };
    }
}

/// Copy `data` into guest memory at `dst`.
///
/// # Safety
/// `dst` must be valid for writes of `data.len()` bytes.
pub unsafe fn copy_to_guest(data: &[u8], dst: *mut u8) {
    for (i, b) in data.iter().enumerate() {
        // SAFETY: the caller's promise.
        unsafe { dst.add(i).write_volatile(*b) };
    }
}

/// Load the `index`th 32-bit word at `base` whole.
///
/// # Safety
/// `base` must be 4-byte aligned and valid for reads of `4 * (index + 1)` bytes.
pub unsafe fn load_word(base: *const u8, index: usize) -> u32 {
    // SAFETY: the caller's promise; atomic because another party stores it.
    unsafe { AtomicU32::from_ptr(base.add(4 * index) as *mut u32) }.load(Ordering::Acquire)
}

/// Store the `index`th 32-bit word at `base` in one store.
///
/// # Safety
/// `base` must be 4-byte aligned and valid for writes of `4 * (index + 1)` bytes.
pub unsafe fn store_word(base: *mut u8, index: usize, value: u32, order: Ordering) {
    // SAFETY: the caller's promise.
    unsafe { AtomicU32::from_ptr(base.add(4 * index) as *mut u32) }.store(value, order)
}

pub fn denied(addr: u64, len: u64, write: bool) -> DmaError {
    let what = if write { "write to" } else { "read from" };
    DmaError(format!("DMA {what} {addr:#x}+{len:#x}: not permitted"))
}

/// A fallback for memory with no messages at all (tests, fuzzing): anything the
/// table does not map is unreachable.
pub struct NoFallback;

impl Fallback for NoFallback {
    fn check(&self, addr: u64, len: u64, _write: bool) -> Result<(), DmaError> {
        Err(DmaError(format!("DMA to {addr:#x}+{len:#x}: not mapped")))
    }
    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), DmaError> {
        self.check(addr, buf.len() as u64, false)
    }
    fn write(&self, addr: u64, data: &[u8]) -> Result<(), DmaError> {
        self.check(addr, data.len() as u64, true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(ram: &mut [u8]) -> GuestMemory {
        let mut m = GuestMemory::default();
        m.set(vec![
            Region {
                iova: 0x1000,
                len: 0x1000,
                host: ram.as_mut_ptr() as usize,
                readable: true,
                writable: true,
            },
            Region {
                iova: 0x2000,
                len: 0x1000,
                host: ram[0x1000..].as_mut_ptr() as usize,
                readable: true,
                writable: false,
            },
        ]);
        m
    }

    #[test]
    fn inside_one_region_is_mapped_and_checked() {
        let mut ram = vec![0u8; 0x2000];
        let m = table(&mut ram);
        assert!(matches!(
            m.view(0x1000, 0x1000, true, &NoFallback),
            Ok(View::Mapped(_))
        ));
        assert_eq!(
            m.view(0x2000, 16, true, &NoFallback),
            Err(denied(0x2000, 16, true))
        );
        assert!(matches!(
            m.view(0x2000, 16, false, &NoFallback),
            Ok(View::Mapped(_))
        ));
        // spans two regions, or a gap: the fallback decides
        assert!(m.view(0x1ff0, 32, false, &NoFallback).is_err());
        assert!(m.view(u64::MAX - 3, 8, false, &NoFallback).is_err());
        m.store_u32(0x1004, 0xdead_beef, &NoFallback).unwrap();
        assert_eq!(m.load_u32(0x1004, &NoFallback).unwrap(), 0xdead_beef);
        assert_eq!(&ram[4..8], &0xdead_beefu32.to_le_bytes());
    }

    #[test]
    fn regions_mapped_and_unmapped_one_by_one_keep_the_table_sorted() {
        let mut ram = vec![0u8; 0x3000];
        let mut m = table(&mut ram);
        let before = m.generation;
        m.insert(Region {
            iova: 0x8000,
            len: 0x1000,
            host: ram[0x2000..].as_mut_ptr() as usize,
            readable: true,
            writable: true,
        });
        m.insert(Region {
            iova: 0x0,
            len: 0x1000,
            host: 0,
            readable: true,
            writable: true,
        });
        let iovas: Vec<u64> = m.regions().iter().map(|r| r.iova).collect();
        assert_eq!(iovas, [0x0, 0x1000, 0x2000, 0x8000]);
        assert!(matches!(
            m.view(0x8000, 16, true, &NoFallback),
            Ok(View::Mapped(_))
        ));
        m.remove(&[0x8000, 0x1000, 0x5000]);
        let iovas: Vec<u64> = m.regions().iter().map(|r| r.iova).collect();
        assert_eq!(iovas, [0x0, 0x2000]);
        assert!(m.view(0x8000, 16, true, &NoFallback).is_err());
        assert!(m.generation > before + 2);
    }
}
