//! Namespaces and the storage under them, as the native engines reach it: regular
//! files, block devices and windows of either (backends/file.py, window.py), the null
//! store, Ceph RBD images (backends/rbd.py, rbd.rs), and the rest (passthrough,
//! anything else), which the Python side serves.
//!
//! The descriptors belong to the Python backends, which opened (and claimed, and
//! locked) them; they stay open while a namespace that names them is attached here:
//! a namespace is detached (with nothing in flight) before its backend is closed.

use std::io;
use std::os::fd::RawFd;

use crate::media_errors::StoreSize;

/// The most buffers one preadv/pwritev takes (UIO_MAXIOV).
pub const IOV_MAX: usize = 1024;
const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
const BLKZEROOUT: libc::c_ulong = 0x127F;
const ZERO_CHUNK: usize = 1 << 20;

/// A regular file or block device, or a window of one.
#[derive(Clone, Debug)]
pub struct FileStore {
    pub fd: RawFd,
    /// the same storage opened O_DIRECT, or -1
    pub direct_fd: RawFd,
    /// what O_DIRECT needs aligned: buffer addresses, lengths, offsets
    pub direct_align: u64,
    /// byte 0 of the namespace in the file or device (a window's start)
    pub base: u64,
    pub block_device: bool,
    /// the backend was opened read-only (its flush does nothing)
    pub readonly: bool,
    /// how a buffered read that the page cache may answer is best done (`read_policy`)
    pub cached_reads: CachedReads,
}

/// Buffered reads (not O_DIRECT) of a store, when an engine could queue them instead.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CachedReads {
    /// Memory is the storage (tmpfs, ramfs): a read never waits for a device, so it is
    /// done at once. (io_uring cannot do tmpfs reads inline and hands every one to a
    /// worker thread: 17 µs at QD1 against 2.7 µs in place, measured.)
    InPlace,
    /// Try at once without blocking (RWF_NOWAIT): what the page cache holds is read in
    /// place, a miss goes to the engine (which overlaps it with others).
    NoWait,
    /// The filesystem cannot say whether a read would block: the engine takes them all.
    Engine,
}

const TMPFS_MAGIC: i64 = 0x0102_1994;
const RAMFS_MAGIC: i64 = 0x8584_58f6;

impl CachedReads {
    /// The policy for the storage behind `fd`.
    pub fn for_fd(fd: RawFd, block_device: bool) -> CachedReads {
        if block_device {
            return CachedReads::NoWait;
        }
        // SAFETY: fstatfs fills a statfs we own.
        let mut st: libc::statfs = unsafe { std::mem::zeroed() };
        if unsafe { libc::fstatfs(fd, &mut st) } == 0 {
            let kind = st.f_type as i64;
            if kind == TMPFS_MAGIC || kind == RAMFS_MAGIC {
                return CachedReads::InPlace;
            }
        }
        CachedReads::NoWait
    }
}

#[derive(Clone, Debug)]
pub enum Store {
    File(FileStore),
    /// No storage: reads leave the guest's buffer as it is, writes are dropped.
    Null,
    /// A Ceph RBD image, through librbd's asynchronous calls (rbd.rs).
    Rbd(crate::rbd::RbdStore),
    /// Served by the Python side: every command for it goes the slow way.
    Python,
}

#[derive(Clone, Debug)]
pub struct Namespace {
    pub nsid: u32,
    pub store: Store,
    pub lba_shift: u32,
    pub blocks: u64,
    /// write protected (the spec's ro, or the host's storage went read-only)
    pub readonly: bool,
    /// its storage is gone: every command fails at once (Namespace Not Ready)
    pub failure: Option<String>,
    /// commands go to a host NVMe namespace as they are (the Python side does that)
    pub passthrough: bool,
    /// what the user named, for messages
    pub description: String,
}

impl Namespace {
    /// (offset, length) in the store of `nlb` blocks from `slba`; None past the end.
    pub fn byte_range(&self, slba: u64, nlb: u64) -> Option<(u64, u64)> {
        let end = u128::from(slba) + u128::from(nlb);
        if end > u128::from(self.blocks) {
            return None;
        }
        Some((slba << self.lba_shift, nlb << self.lba_shift))
    }
}

/// A failed access: the errno, and whether a read met the end of the store.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IoFailure {
    pub errno: i32,
    pub past_end: bool,
}

impl IoFailure {
    fn last_os() -> IoFailure {
        IoFailure {
            errno: io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EIO),
            past_end: false,
        }
    }
}

pub type IoResult<T> = Result<T, IoFailure>;

fn check(ret: libc::c_int) -> IoResult<()> {
    if ret < 0 {
        Err(IoFailure::last_os())
    } else {
        Ok(())
    }
}

impl FileStore {
    /// Read [offset, offset + total) of the namespace into `iov`, or write it from
    /// there, every byte: short transfers go on where they stopped, a read that meets
    /// the end of the store fails with past_end (backends/file.py _finish_short).
    pub fn transfer(
        &self,
        offset: u64,
        iov: &[libc::iovec],
        write: bool,
        fua: bool,
    ) -> IoResult<()> {
        let mut at = self.base + offset;
        let flags = if write && fua { libc::RWF_DSYNC } else { 0 };
        for chunk in iov.chunks(IOV_MAX) {
            let total: usize = chunk.iter().map(|v| v.iov_len).sum();
            // SAFETY: each iovec is a range of mapped guest memory (or the discard
            // buffer) that the caller keeps mapped for the call (memory.rs).
            let done = unsafe { rw(self.fd, chunk, at, write, flags) };
            let done = match done {
                Ok(n) => n,
                Err(e) if e.errno == libc::EINTR => 0,
                Err(e) => return Err(e),
            };
            if done < total {
                self.finish_short(chunk, done, at, write, flags)?;
            }
            at += total as u64;
        }
        Ok(())
    }

    fn finish_short(
        &self,
        iov: &[libc::iovec],
        mut done: usize,
        at: u64,
        write: bool,
        flags: libc::c_int,
    ) -> IoResult<()> {
        let mut pos = 0usize;
        for v in iov {
            let end = pos + v.iov_len;
            while done < end {
                let skip = done - pos;
                let piece = libc::iovec {
                    // (within the caller's iovec)
                    iov_base: (v.iov_base as *mut u8).wrapping_add(skip).cast(),
                    iov_len: v.iov_len - skip,
                };
                // SAFETY: as in transfer()
                let n = match unsafe {
                    rw(
                        self.fd,
                        std::slice::from_ref(&piece),
                        at + done as u64,
                        write,
                        flags,
                    )
                } {
                    Ok(n) => n,
                    Err(e) if e.errno == libc::EINTR => continue,
                    Err(e) => return Err(e),
                };
                if n == 0 {
                    return Err(IoFailure {
                        errno: libc::EIO,
                        past_end: true,
                    });
                }
                done += n;
            }
            pos = end;
        }
        Ok(())
    }

    /// Read without blocking (RWF_NOWAIT): Ok(true) if it all came from the page cache,
    /// Ok(false) if some of it would have to wait for the device (the caller queues it).
    pub fn read_nowait(&self, offset: u64, iov: &[libc::iovec]) -> IoResult<bool> {
        if iov.len() > IOV_MAX {
            return Ok(false);
        }
        let total: usize = iov.iter().map(|v| v.iov_len).sum();
        // SAFETY: as in transfer().
        let n = unsafe {
            libc::preadv2(
                self.fd,
                iov.as_ptr(),
                iov.len() as libc::c_int,
                (self.base + offset) as libc::off_t,
                libc::RWF_NOWAIT,
            )
        };
        if n < 0 {
            let e = IoFailure::last_os();
            return match e.errno {
                libc::EAGAIN | libc::EOPNOTSUPP | libc::EINTR => Ok(false),
                _ => Err(e),
            };
        }
        Ok(n as usize == total)
    }

    /// Make every completed write durable.
    pub fn flush(&self) -> IoResult<()> {
        if self.readonly {
            return Ok(());
        }
        // SAFETY: a plain system call on a descriptor we hold.
        check(unsafe { libc::fdatasync(self.fd) })
    }

    /// Make [offset, offset + length) read as zeroes; a file may release the space.
    pub fn write_zeroes(&self, offset: u64, length: u64, deallocate: bool) -> IoResult<()> {
        let at = self.base + offset;
        if self.block_device {
            // Discard does not promise zeroes on most devices; zero-out does.
            let range = [at, length];
            // SAFETY: BLKZEROOUT reads a u64[2] we own.
            return check(unsafe { libc::ioctl(self.fd, BLKZEROOUT, range.as_ptr()) });
        }
        let mode = if deallocate {
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
        } else {
            libc::FALLOC_FL_ZERO_RANGE
        };
        // SAFETY: a plain system call.
        if unsafe { libc::fallocate(self.fd, mode, at as libc::off_t, length as libc::off_t) } == 0
        {
            return Ok(());
        }
        let err = IoFailure::last_os();
        if !matches!(err.errno, libc::EOPNOTSUPP | libc::ENOSYS | libc::EINVAL) {
            return Err(err);
        }
        // The filesystem can't: write the zeroes by hand.
        let zeroes = vec![0u8; ZERO_CHUNK];
        let (mut pos, end) = (at, at + length);
        while pos < end {
            let n = ((end - pos) as usize).min(ZERO_CHUNK);
            // SAFETY: `zeroes` is ours and n bytes long.
            let w = unsafe { libc::pwrite(self.fd, zeroes.as_ptr().cast(), n, pos as libc::off_t) };
            if w < 0 {
                let e = IoFailure::last_os();
                if e.errno == libc::EINTR {
                    continue;
                }
                return Err(e);
            }
            pos += w as u64;
        }
        Ok(())
    }

    /// Bytes the storage holds now (a file's length, a device's capacity).
    pub fn store_size(&self) -> StoreSize {
        if self.block_device {
            let mut size: u64 = 0;
            // SAFETY: BLKGETSIZE64 writes one u64 we own.
            if unsafe { libc::ioctl(self.fd, BLKGETSIZE64, &mut size as *mut u64) } < 0 {
                return StoreSize::Failed(IoFailure::last_os().errno);
            }
            return StoreSize::Bytes(size);
        }
        // SAFETY: fstat fills a stat we own.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        if unsafe { libc::fstat(self.fd, &mut st) } < 0 {
            return StoreSize::Failed(IoFailure::last_os().errno);
        }
        StoreSize::Bytes(st.st_size as u64)
    }
}

/// One preadv2/pwritev2 of `iov` at `offset`.
///
/// # Safety
/// Every iovec must be valid for the kernel to write (a read) or read (a write).
unsafe fn rw(
    fd: RawFd,
    iov: &[libc::iovec],
    offset: u64,
    write: bool,
    flags: libc::c_int,
) -> IoResult<usize> {
    let n = if write {
        // SAFETY: the caller's promise
        unsafe {
            libc::pwritev2(
                fd,
                iov.as_ptr(),
                iov.len() as libc::c_int,
                offset as libc::off_t,
                flags,
            )
        }
    } else {
        // SAFETY: the caller's promise
        unsafe {
            libc::preadv2(
                fd,
                iov.as_ptr(),
                iov.len() as libc::c_int,
                offset as libc::off_t,
                0,
            )
        }
    };
    if n < 0 {
        Err(IoFailure::last_os())
    } else {
        Ok(n as usize)
    }
}
