//! I/O engines for Reads and Writes (backends/io_engine.py, uring.py): io_uring, many
//! transfers in flight and a pass's worth submitted in one system call; or none at all
//! (`sync`), every transfer done at once through preadv2/pwritev2. What io_uring cannot
//! usefully take it leaves to the caller, who does it at once: a full ring, more
//! buffers than one call takes, and a buffered write without FUA (it only copies into
//! the page cache, which io_uring would hand to a worker thread).

use std::io;

use io_uring::{opcode, types, IoUring};

use crate::storage::{FileStore, IOV_MAX};

/// One transfer submitted to the ring, from submission to release.
pub struct Slot<C> {
    pub ctx: C,
    /// the guest buffers, as the kernel reads them: kept here until the completion
    pub iov: Vec<libc::iovec>,
    pub store: Option<FileStore>,
    pub offset: u64,
    pub length: u64,
    pub write: bool,
    pub fua: bool,
    /// bytes moved, or -errno
    pub result: i32,
}

pub struct Engine<C> {
    ring: Option<IoUring>,
    pub slots: Vec<Slot<C>>,
    free: Vec<u32>,
    /// submitted and not yet released
    pub in_flight: u32,
    /// submitted and not yet reaped
    outstanding: u32,
    /// SQEs prepared since the last submit
    unsubmitted: u32,
    /// transfers sent O_DIRECT
    pub direct: u64,
}

impl<C: Default> Engine<C> {
    /// `uring`: io_uring with `entries` slots; else the synchronous engine.
    pub fn new(uring: bool, entries: u32) -> io::Result<Engine<C>> {
        let ring = if uring {
            Some(IoUring::new(entries)?)
        } else {
            None
        };
        let n = ring.as_ref().map_or(0, |r| r.params().sq_entries());
        let slots = (0..n)
            .map(|_| Slot {
                ctx: C::default(),
                iov: Vec::new(),
                store: None,
                offset: 0,
                length: 0,
                write: false,
                fua: false,
                result: 0,
            })
            .collect();
        Ok(Engine {
            ring,
            slots,
            free: (0..n).rev().collect(),
            in_flight: 0,
            outstanding: 0,
            unsubmitted: 0,
            direct: 0,
        })
    }

    pub fn is_uring(&self) -> bool {
        self.ring.is_some()
    }

    /// Whether a transfer would go O_DIRECT (past the page cache) if submitted.
    pub fn direct_eligible(&self, store: &FileStore, offset: u64, iov: &[libc::iovec]) -> bool {
        if store.direct_fd < 0 {
            return false;
        }
        let mut bits = store.base + offset;
        for v in iov {
            bits |= v.iov_base as u64 | v.iov_len as u64;
        }
        bits & (store.direct_align - 1) == 0
    }

    /// Submit a transfer of `length` bytes at `offset` of `store` to or from `iov`;
    /// the slot it went to, or the context back when the caller must do it at once.
    #[allow(clippy::too_many_arguments)]
    pub fn try_submit(
        &mut self,
        store: &FileStore,
        offset: u64,
        iov: &[libc::iovec],
        length: u64,
        write: bool,
        fua: bool,
        ctx: C,
    ) -> Result<u32, C> {
        let Some(ring) = self.ring.as_mut() else {
            return Err(ctx);
        };
        if iov.len() > IOV_MAX || self.free.is_empty() {
            return Err(ctx);
        }
        let buffered_write_in_place = write && !fua;
        if buffered_write_in_place && store.direct_fd < 0 {
            return Err(ctx);
        }
        let at = store.base + offset;
        let mut fd = store.fd;
        if store.direct_fd >= 0 {
            let mut bits = at;
            for v in iov {
                bits |= v.iov_base as u64 | v.iov_len as u64;
            }
            if bits & (store.direct_align - 1) == 0 {
                fd = store.direct_fd; // past the host's page cache
            } else if buffered_write_in_place {
                return Err(ctx);
            }
        }
        let index = self.free.pop().expect("checked above");
        let slot = &mut self.slots[index as usize];
        slot.iov.clear();
        slot.iov.extend_from_slice(iov);
        let entry = if write {
            opcode::Writev::new(types::Fd(fd), slot.iov.as_ptr(), slot.iov.len() as u32)
                .offset(at)
                .rw_flags(if fua { libc::RWF_DSYNC } else { 0 })
                .build()
        } else {
            opcode::Readv::new(types::Fd(fd), slot.iov.as_ptr(), slot.iov.len() as u32)
                .offset(at)
                .build()
        };
        // SAFETY: the iovec array and the buffers it names stay valid until the
        // completion is reaped: the array lives in the slot, which is not reused before
        // release(); the guest memory stays mapped while anything is in flight (a
        // DMA_UNMAP drains first, memory.rs).
        if unsafe { ring.submission().push(&entry.user_data(u64::from(index))) }.is_err() {
            self.free.push(index);
            return Err(ctx);
        }
        if fd == store.direct_fd {
            self.direct += 1;
        }
        slot.ctx = ctx;
        slot.store = Some(store.clone());
        slot.offset = offset;
        slot.length = length;
        slot.write = write;
        slot.fua = fua;
        self.in_flight += 1;
        self.outstanding += 1;
        self.unsubmitted += 1;
        Ok(index)
    }

    /// Hand what was submitted since the last call to the kernel, in one system call.
    pub fn submit(&mut self) {
        if let Some(ring) = self.ring.as_mut() {
            if self.unsubmitted > 0 {
                // EAGAIN/EBUSY: short of kernel resources, the rest goes with the next call
                if ring.submit().is_ok() {
                    self.unsubmitted = 0;
                }
            }
        }
    }

    /// The slots whose transfers ended (their `result` set), without a system call.
    pub fn reap(&mut self, done: &mut Vec<u32>) {
        let Some(ring) = self.ring.as_mut() else {
            return;
        };
        for cqe in ring.completion() {
            let index = cqe.user_data() as u32;
            self.slots[index as usize].result = cqe.result();
            self.outstanding -= 1;
            done.push(index);
        }
    }

    /// Block until a transfer in flight ends, `timeout_ns` at most (None: for good).
    pub fn wait(&mut self, timeout_ns: Option<u64>) {
        let Some(ring) = self.ring.as_mut() else {
            return;
        };
        if self.outstanding == 0 {
            return;
        }
        let result = match timeout_ns {
            None => ring.submit_and_wait(1),
            Some(ns) => {
                let ts = types::Timespec::new()
                    .sec(ns / 1_000_000_000)
                    .nsec((ns % 1_000_000_000) as u32);
                let args = types::SubmitArgs::new().timespec(&ts);
                ring.submitter().submit_with_args(1, &args)
            }
        };
        if result.is_ok() {
            self.unsubmitted = 0;
        }
    }

    pub fn outstanding(&self) -> u32 {
        self.outstanding
    }

    /// The slot is finished with.
    pub fn release(&mut self, index: u32) {
        let slot = &mut self.slots[index as usize];
        slot.ctx = C::default();
        slot.store = None;
        self.free.push(index);
        self.in_flight -= 1;
    }
}
