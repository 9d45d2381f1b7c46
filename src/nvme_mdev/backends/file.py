"""Regular files and block devices (whole disks or partitions), with positional
vectored I/O straight into guest memory."""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import stat
import struct
from collections.abc import Sequence

from ..handover import descriptors
from .base import IoTarget

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

BLKGETSIZE64 = 0x80081272
BLKSSZGET = 0x1268
BLKDISCARD = 0x1277
BLKZEROOUT = 0x127F

_ZERO_CHUNK = bytes(1 << 20)
#: buffers one preadv/pwritev takes (UIO_MAXIOV); more is EINVAL. An SGL of byte-sized
#: blocks, or 4 MiB (MDTS 10) of scattered pages, can be more.
IOV_MAX = 1024


class BackendError(Exception):
    """A backing store that cannot be used as configured; the message says why."""


class EndOfStorage(OSError):
    """A read met the end of the file or device before the namespace's end: the store
    shrank under a namespace that was not rescanned."""

    def __init__(self, offset: int) -> None:
        super().__init__(errno.EIO, f"end of the backing store at byte {offset}")


#: O_DIRECT alignment assumed for a regular file: a page satisfies every filesystem's
#: (Python 3.11 has no statx to ask for STATX_DIOALIGN), and guest buffers are pages
FILE_DIRECT_ALIGN = 4096


class FileBackend:
    """A regular file or a block device, used whole."""

    def __init__(
        self, path: str, readonly: bool = False, exclusive: bool = True, direct: bool | None = None
    ) -> None:
        """`exclusive`: open a block device with O_EXCL (refused while mounted or held).
        The daemon passes False when it holds that claim itself, on a descriptor it
        shares among the namespaces on one disk (storage.HostStorage).

        `direct`: also open the storage O_DIRECT, for an I/O engine's transfers whose
        buffers and offsets are aligned (see io_target); None: for block devices only
        (no host page cache between the guest's and the disk), not for files (the page
        cache is what makes a small hot image fast). Asked for where the filesystem
        cannot do it: BackendError; by default there, buffered."""
        self.description = path
        self.readonly = readonly
        flags = (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC
        try:
            st = os.stat(path)
        except OSError as exc:
            raise BackendError(f"{path}: {exc.strerror}") from exc
        self.is_block_device = stat.S_ISBLK(st.st_mode)
        if not (self.is_block_device or stat.S_ISREG(st.st_mode)):
            raise BackendError(f"{path}: not a regular file or block device")
        if self.is_block_device and exclusive:
            flags |= os.O_EXCL  # refuse a device that is mounted or held by someone else
        try:
            self.fd = descriptors.open_fd(path, flags)
        except OSError as exc:
            hint = " (mounted or in use?)" if exc.errno == errno.EBUSY else ""
            raise BackendError(f"{path}: {exc.strerror}{hint}") from exc
        if self.is_block_device:
            self.size = self.store_size()
            self.block_size = struct.unpack("i", fcntl.ioctl(self.fd, BLKSSZGET, bytes(4)))[0]
        else:
            self.size = st.st_size
            self.block_size = 1
        self.direct_fd = -1
        self.direct_align = 0
        if direct or (direct is None and self.is_block_device):
            try:
                # Not O_EXCL: the claim (ours, or the daemon's) is the descriptor above.
                self.direct_fd = descriptors.open_fd(path, (flags & ~os.O_EXCL) | os.O_DIRECT)
            except OSError as exc:
                if direct:
                    descriptors.close_fd(self.fd)
                    raise BackendError(
                        f"{path}: O_DIRECT: {exc.strerror} (use direct=off)"
                    ) from exc
            else:
                self.direct_align = self.block_size if self.is_block_device else FILE_DIRECT_ALIGN

    def store_size(self) -> int:
        if self.is_block_device:
            # A deleted disk (hot unplug, del_gendisk) reports capacity 0.
            return int(struct.unpack("Q", fcntl.ioctl(self.fd, BLKGETSIZE64, bytes(8)))[0])
        return os.fstat(self.fd).st_size

    def current_size(self) -> int:
        return self.store_size()

    def readv(self, offset: int, buffers: Sequence[memoryview]) -> None:
        try:
            done = os.preadv(self.fd, buffers, offset)
        except OSError as exc:  # (a try costs nothing until it raises)
            if exc.errno != errno.EINVAL or len(buffers) <= IOV_MAX:
                raise
            done = 0  # more buffers than one call takes: _finish_short goes one by one
        total = sum(b.nbytes for b in buffers)
        if done != total:
            self._finish_short(offset, buffers, done, write=False)

    def writev(self, offset: int, buffers: Sequence[memoryview], fua: bool) -> None:
        try:
            done = os.pwritev(self.fd, buffers, offset, os.RWF_DSYNC if fua else 0)
        except OSError as exc:
            if exc.errno != errno.EINVAL or len(buffers) <= IOV_MAX:
                raise
            done = 0
        total = sum(b.nbytes for b in buffers)
        if done != total:
            self._finish_short(offset, buffers, done, write=True, fua=fua)

    def _finish_short(
        self,
        offset: int,
        buffers: Sequence[memoryview],
        done: int,
        write: bool,
        fua: bool = False,
    ) -> None:
        """Continue a partial transfer byte-exactly (signals, or a file that shrank)."""
        flat = [b.cast("B") for b in buffers]
        pos = 0
        for buf in flat:
            end = pos + buf.nbytes
            if end > done:
                start = max(0, done - pos)
                view = buf[start:]
                while view.nbytes:
                    at = offset + pos + start
                    if write:
                        n = os.pwritev(self.fd, [view], at, os.RWF_DSYNC if fua else 0)
                    else:
                        n = os.preadv(self.fd, [view], at)
                    if n == 0:
                        raise EndOfStorage(at)
                    view = view[n:]
                    start += n
            pos = end

    def io_target(self) -> IoTarget | None:
        if self.fd < 0:
            return None
        return IoTarget(self.fd, 0, self.direct_fd, self.direct_align)

    def flush(self) -> None:
        if not self.readonly:
            os.fdatasync(self.fd)

    def write_zeroes(self, offset: int, length: int, deallocate: bool) -> None:
        if self.is_block_device:
            # Discard does not promise zeroes on most devices; zero-out does (and may unmap).
            fcntl.ioctl(self.fd, BLKZEROOUT, struct.pack("QQ", offset, length))
            return
        mode = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE if deallocate else FALLOC_FL_ZERO_RANGE
        if not self._fallocate(mode, offset, length):
            self._write_zero_bytes(offset, length)  # the filesystem can't: by hand

    def deallocate(self, offset: int, length: int) -> None:
        if self.is_block_device:
            try:
                fcntl.ioctl(self.fd, BLKDISCARD, struct.pack("QQ", offset, length))
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                    raise
            return
        # Deallocated blocks of a file must read as zeroes (the namespace reports
        # DLFEAT 001b): where holes cannot be punched, write the zeroes instead.
        if not self._fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length):
            self._write_zero_bytes(offset, length)

    def _write_zero_bytes(self, offset: int, length: int) -> None:
        pos, end = offset, offset + length
        while pos < end:
            n = os.pwrite(self.fd, _ZERO_CHUNK[: min(len(_ZERO_CHUNK), end - pos)], pos)
            pos += n

    def _fallocate(self, mode: int, offset: int, length: int) -> bool:
        """True if done; False if the filesystem does not support the mode."""
        if _libc.fallocate(self.fd, mode, offset, length) == 0:
            return True
        err = ctypes.get_errno()
        if err in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            return False
        raise OSError(err, os.strerror(err))

    def close(self) -> None:
        if self.fd >= 0:
            descriptors.close_fd(self.fd)
            self.fd = -1
        if self.direct_fd >= 0:
            descriptors.close_fd(self.direct_fd)
            self.direct_fd = -1


class NullBackend:
    """No storage: writes are dropped and reads leave the guest buffer as it is.
    It isolates the device's own cost in benchmarks."""

    block_size = 1
    readonly = False

    def __init__(self, size: int) -> None:
        self.size = size
        self.description = f"null:{size}"

    def store_size(self) -> int:
        return self.size

    def current_size(self) -> int:
        return self.size

    def readv(self, offset: int, buffers: Sequence[memoryview]) -> None:
        pass

    def writev(self, offset: int, buffers: Sequence[memoryview], fua: bool) -> None:
        pass

    def io_target(self) -> IoTarget | None:
        return None  # nothing to read or write: the synchronous no-op is the fastest

    def flush(self) -> None:
        pass

    def write_zeroes(self, offset: int, length: int, deallocate: bool) -> None:
        pass

    def deallocate(self, offset: int, length: int) -> None:
        pass

    def close(self) -> None:
        pass
