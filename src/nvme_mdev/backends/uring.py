"""A minimal io_uring over the raw system calls, and the I/O engine built on it.

The ring is set up with io_uring_setup(2) and reached through two shared mappings
(the SQ and CQ rings in one, IORING_FEAT_SINGLE_MMAP; the SQE array in the other).
SQEs are written in place, a batch is submitted with one io_uring_enter(2), and
completions are taken from the CQ ring without a system call when they are there.
Only what the device needs: READV, WRITEV (RWF_DSYNC for FUA), FSYNC, and
URING_CMD for NVMe passthrough, which needs 128-byte SQEs and 32-byte CQEs
(IORING_SETUP_SQE128 | IORING_SETUP_CQE32, Linux 5.19): the engine sets its one ring
up that way where the kernel allows it, so that a passthrough namespace added at any
time shares the ring (and the one submit per pass) with the files.

Why not the PyPI `liburing` binding: its own docstrings say "Coded but not
tested!!!" and, for batch CQE peeking, "Don't use this function ... most likely
segfault". A storage daemon cannot risk either; ctypes and mmap from the standard
library are enough for the few calls used here.

Memory ordering: the ring indices are shared with the kernel. Each is loaded and
stored whole, as one aligned 4-byte access through a memoryview cast to "I"
(struct.pack_into zeroes its target before writing, see guest_memory.words32).
x86-64 keeps stores in order and loads in order, which is all the ring protocol
needs from user space there (the kernel side has its own barriers); other
architectures would need explicit acquire/release fences, so `unavailable()` says
so and the synchronous engine is used there.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import platform
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

from . import passthrough
from .io_engine import IOV_MAX, Transfer, TransferPool, run_now

# System call numbers: the same in every architecture's table since Linux 5.1.
SYS_IO_URING_SETUP: Final = 425
SYS_IO_URING_ENTER: Final = 426
SYS_IO_URING_REGISTER: Final = 427

IORING_SETUP_SQE128: Final = 1 << 10
IORING_SETUP_CQE32: Final = 1 << 11
#: the setup flags a passthrough-capable ring needs
IORING_SETUP_BIG: Final = IORING_SETUP_SQE128 | IORING_SETUP_CQE32

IORING_OFF_SQ_RING: Final = 0
IORING_OFF_SQES: Final = 0x10000000
IORING_FEAT_SINGLE_MMAP: Final = 1 << 0
IORING_FEAT_NODROP: Final = 1 << 1
IORING_FEAT_EXT_ARG: Final = 1 << 8
IORING_ENTER_GETEVENTS: Final = 1 << 0
IORING_ENTER_EXT_ARG: Final = 1 << 3

IORING_OP_NOP: Final = 0
IORING_OP_READV: Final = 1
IORING_OP_WRITEV: Final = 2
IORING_OP_FSYNC: Final = 3
IORING_OP_URING_CMD: Final = 46
IORING_FSYNC_DATASYNC: Final = 1 << 0

RWF_DSYNC: Final = os.RWF_DSYNC

# struct io_uring_params: 10 u32, then io_sqring_offsets and io_cqring_offsets
# (8 u32 and a u64 each): 120 bytes.
_PARAMS = struct.Struct("<10I8IQ8IQ")
# struct io_uring_sqe, 64 bytes: opcode, flags, ioprio, fd, off, addr, len, rw_flags,
# user_data, buf_index, personality, splice_fd_in, addr3, pad
_SQE = struct.Struct("<BBHiQQIIQHHiQQ")
# The same SQE for IORING_OP_URING_CMD: cmd_op (u32) and a pad where `off` was, and the
# command's own bytes from 48 on (16 of them in a 64-byte SQE, 80 with SQE128).
_SQE_CMD_HEAD = struct.Struct("<BBHiIIQIIQHHi")
URING_CMD_OFFSET: Final = 48
# struct io_uring_cqe: user_data, res, flags (and with CQE32, big_cqe[2])
_CQE = struct.Struct("<QiI")
_CQE32 = struct.Struct("<QiIQ8x")

_libc = ctypes.CDLL(None, use_errno=True)  # CDLL: calls drop the GIL while they block
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long

_c_char = ctypes.c_char
_addressof = ctypes.addressof


class _GeteventsArg(ctypes.Structure):
    """struct io_uring_getevents_arg (IORING_ENTER_EXT_ARG)"""

    _fields_ = (
        ("sigmask", ctypes.c_uint64),
        ("sigmask_sz", ctypes.c_uint32),
        ("pad", ctypes.c_uint32),
        ("ts", ctypes.c_uint64),
    )


class _Timespec(ctypes.Structure):
    """struct __kernel_timespec"""

    _fields_ = (("tv_sec", ctypes.c_int64), ("tv_nsec", ctypes.c_int64))


def _enter(
    fd: int, to_submit: int, min_complete: int, flags: int, arg: int = 0, argsz: int = 0
) -> int:
    """io_uring_enter(2); OSError on failure (EINTR is retried)."""
    while True:
        n = _syscall(
            ctypes.c_long(SYS_IO_URING_ENTER),
            ctypes.c_long(fd),
            ctypes.c_long(to_submit),
            ctypes.c_long(min_complete),
            ctypes.c_long(flags),
            ctypes.c_void_p(arg),
            ctypes.c_long(argsz),
        )
        if n >= 0:
            return int(n)
        err = ctypes.get_errno()
        if err != errno.EINTR:
            raise OSError(err, f"io_uring_enter: {os.strerror(err)}")


class Ring:
    """One io_uring: a submission queue of `entries` SQEs and a completion queue of
    twice as many CQEs; `flags` 0 or IORING_SETUP_BIG (128-byte SQEs, 32-byte CQEs:
    what URING_CMD needs). Not thread-safe: one thread at a time uses it."""

    def __init__(self, entries: int = 256, flags: int = 0) -> None:
        params = ctypes.create_string_buffer(_PARAMS.size)
        struct.pack_into("<I", params, 8, flags)  # io_uring_params.flags
        fd = _syscall(ctypes.c_long(SYS_IO_URING_SETUP), ctypes.c_long(entries), params)
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"io_uring_setup: {os.strerror(err)}")
        self.fd = int(fd)
        self.flags = flags
        self._sqe_size = 128 if flags & IORING_SETUP_SQE128 else 64
        self._cqe_size = 32 if flags & IORING_SETUP_CQE32 else 16
        try:
            self._map(_PARAMS.unpack(params.raw))
        except BaseException:
            os.close(self.fd)
            raise

    def _map(self, p: tuple[int, ...]) -> None:
        sq_entries, cq_entries, _flags, _cpu, _idle, features = p[:6]
        self.features = features
        if not features & IORING_FEAT_SINGLE_MMAP or not features & IORING_FEAT_NODROP:
            raise OSError(errno.ENOSYS, "io_uring: kernel older than 5.5 (no SINGLE_MMAP/NODROP)")
        sq_head, sq_tail, sq_mask, _, _, _, sq_array = p[10:17]
        cq_head, cq_tail, cq_mask, _, _, cqes = p[19:25]
        size = max(sq_array + 4 * sq_entries, cqes + self._cqe_size * cq_entries)
        prot = mmap.PROT_READ | mmap.PROT_WRITE
        # MAP_POPULATE: the kernel's pages, mapped now rather than faulted in later
        flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
        self._ring = mmap.mmap(self.fd, size, flags, prot, offset=IORING_OFF_SQ_RING)
        self._sqes = mmap.mmap(
            self.fd, sq_entries * self._sqe_size, flags, prot, offset=IORING_OFF_SQES
        )
        self._words = memoryview(self._ring).cast("I")
        self.sq_entries = sq_entries
        self.cq_entries = cq_entries
        self._sq_head = sq_head // 4  # word indexes into _words
        self._sq_tail = sq_tail // 4
        self._cq_head = cq_head // 4
        self._cq_tail = cq_tail // 4
        self._sq_mask = self._words[sq_mask // 4]
        self._cq_mask = self._words[cq_mask // 4]
        self._cqes = cqes
        # The SQ array indirection: slot i holds SQE i, set once.
        for i in range(sq_entries):
            self._words[sq_array // 4 + i] = i
        # Preallocated: a timed wait allocates nothing.
        self._ts = _Timespec()
        self._arg = _GeteventsArg(0, 0, 0, ctypes.addressof(self._ts))
        self._arg_address = ctypes.addressof(self._arg)
        #: SQEs written but not yet published to the kernel (tail not stored)
        self._tail = self._words[self._sq_tail]
        self._unsubmitted = 0

    # --- submission ---------------------------------------------------------------

    def sq_space(self) -> int:
        """SQEs that can be prepared before the next submit()."""
        return self.sq_entries - ((self._tail - self._words[self._sq_head]) & 0xFFFFFFFF)

    def prep(
        self,
        opcode: int,
        fd: int,
        addr: int,
        length: int,
        offset: int,
        rw_flags: int,
        user_data: int,
    ) -> None:
        """Write one SQE (the caller checked sq_space()). READV/WRITEV: `addr` is an
        iovec array of `length` entries; FSYNC: `rw_flags` is the fsync flags."""
        index = self._tail & self._sq_mask
        _SQE.pack_into(
            self._sqes, index * self._sqe_size, opcode, 0, 0, fd, offset, addr, length, rw_flags,
            user_data, 0, 0, 0, 0, 0,
        )  # fmt: skip
        self._tail = (self._tail + 1) & 0xFFFFFFFF
        self._unsubmitted += 1

    def prep_uring_cmd(self, fd: int, cmd_op: int, cmd: bytes, user_data: int) -> None:
        """Write one IORING_OP_URING_CMD SQE: `cmd` (at most 80 bytes with SQE128, else
        16) goes to the SQE's command area, the rest of which is zeroed."""
        room = self._sqe_size - URING_CMD_OFFSET
        if len(cmd) > room:
            raise ValueError(f"a {len(cmd)}-byte command in a {self._sqe_size}-byte SQE")
        base = (self._tail & self._sq_mask) * self._sqe_size
        _SQE_CMD_HEAD.pack_into(
            self._sqes, base, IORING_OP_URING_CMD, 0, 0, fd, cmd_op, 0, 0, 0, 0,
            user_data, 0, 0, 0,
        )  # fmt: skip
        start = base + URING_CMD_OFFSET
        self._sqes[start : start + room] = cmd.ljust(room, b"\0")
        self._tail = (self._tail + 1) & 0xFFFFFFFF
        self._unsubmitted += 1

    def submit(self, wait: int = 0) -> int:
        """Publish the prepared SQEs and submit them in one io_uring_enter, waiting for
        `wait` completions too. Returns how many the kernel took."""
        n = self._unsubmitted
        if n == 0 and wait == 0:
            return 0
        self._words[self._sq_tail] = self._tail  # one store, after the SQEs (x86: in order)
        done = 0
        flags = IORING_ENTER_GETEVENTS if wait else 0
        while True:
            try:
                taken = _enter(self.fd, n - done, wait, flags)
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EBUSY):
                    self._unsubmitted = n - done
                    raise
                taken = 0  # short of kernel resources: the rest goes with the next submit
            done += taken
            wait, flags = 0, 0
            if done >= n or taken == 0:
                break
        self._unsubmitted = n - done
        return done

    def wait(self, count: int = 1, timeout_ns: int | None = None) -> None:
        """Block until at least `count` completions are in the CQ ring, or `timeout_ns`
        has passed (a kernel without timed waits, before 5.11, returns at once then)."""
        if timeout_ns is None:
            _enter(self.fd, 0, count, IORING_ENTER_GETEVENTS)
            return
        if not self.features & IORING_FEAT_EXT_ARG:
            return
        ts = self._ts
        ts.tv_sec, ts.tv_nsec = divmod(timeout_ns, 1_000_000_000)
        try:
            _enter(
                self.fd,
                0,
                count,
                IORING_ENTER_GETEVENTS | IORING_ENTER_EXT_ARG,
                self._arg_address,
                ctypes.sizeof(_GeteventsArg),
            )
        except OSError as exc:
            if exc.errno != errno.ETIME:
                raise

    # --- completion -----------------------------------------------------------------

    def completions(self) -> list[tuple[int, int]]:
        """Take every (user_data, res) in the CQ ring, without a system call."""
        return [(user_data, res) for user_data, res, _ in self.completions32()]

    def completions32(self) -> list[tuple[int, int, int]]:
        """Take every (user_data, res, big_cqe[0]) in the CQ ring, without a system
        call; big_cqe[0] is 0 in a ring without CQE32 (URING_CMD's extra result: for
        NVMe passthrough, the completion's Dword 0)."""
        words = self._words
        head = words[self._cq_head]
        tail = words[self._cq_tail]  # loaded before the CQEs (x86: loads in order)
        if head == tail:
            return []
        out = []
        mask, base, ring, size = self._cq_mask, self._cqes, self._ring, self._cqe_size
        if size == 32:
            unpack32 = _CQE32.unpack_from
            while head != tail:
                user_data, res, _, extra = unpack32(ring, base + (head & mask) * 32)
                out.append((user_data, res, extra))
                head = (head + 1) & 0xFFFFFFFF
        else:
            unpack = _CQE.unpack_from
            while head != tail:
                user_data, res, _ = unpack(ring, base + (head & mask) * 16)
                out.append((user_data, res, 0))
                head = (head + 1) & 0xFFFFFFFF
        words[self._cq_head] = head  # the entries are ours: the kernel may reuse them
        return out

    def close(self) -> None:
        if self.fd < 0:
            return
        self._words.release()
        self._ring.close()
        self._sqes.close()
        os.close(self.fd)
        self.fd = -1


_unavailable: str | None = None
_probed = False


def unavailable() -> str | None:
    """Why io_uring cannot be used here (None: it can). Probed once."""
    global _unavailable, _probed
    if _probed:
        return _unavailable
    _probed = True
    if platform.machine() != "x86_64":
        _unavailable = f"io_uring ring ordering is only done for x86_64, not {platform.machine()}"
        return _unavailable
    try:
        if Path("/proc/sys/kernel/io_uring_disabled").read_text().strip() not in ("", "0"):
            _unavailable = "io_uring is disabled (/proc/sys/kernel/io_uring_disabled)"
            return _unavailable
    except OSError:
        pass  # older kernels have no such switch
    try:
        Ring(2).close()
    except OSError as exc:
        _unavailable = f"io_uring_setup fails: {exc.strerror or exc}"
    return _unavailable


def buffer_address(view: memoryview) -> int:
    """The host virtual address of a writable, non-empty buffer. The ctypes object that
    finds it is dropped at once, so no export of the buffer outlives this call
    (an export left on guest memory would make DMA_UNMAP's munmap fail).
    TypeError for a read-only buffer, ValueError for an empty one."""
    return _addressof(_c_char.from_buffer(view))


class UringEngine:
    """Reads, writes and NVMe passthrough commands submitted to one io_uring, handed
    to the kernel once per pass of the I/O queues, many in flight. What it cannot
    submit it does at once through the backend (the Transfer comes back done): a
    backend without a descriptor, a full ring, read-only buffers, more buffers than
    one iovec array may hold, passthrough on a kernel without big SQEs, and a buffered
    write without FUA (it only copies into the page cache, which io_uring would hand
    to a worker thread: bench, page cache: 0.5-0.7x).

    Why one ring in the big-SQE mode rather than a second ring for passthrough: the
    I/O thread submits and waits on one descriptor, and a namespace hot-added later
    needs no new ring; the cost for plain reads and writes is 64 more bytes per SQE
    and 16 per CQE (tools/profile_hot_path.py showed no difference in Python's time
    per command)."""

    name = "uring"

    def __init__(self, entries: int = 256) -> None:
        try:
            self.ring = Ring(entries, IORING_SETUP_BIG)
        except OSError as exc:
            if exc.errno != errno.EINVAL:  # (before 5.19: no such flags)
                raise
            self.ring = Ring(entries)
        #: NVMe passthrough commands can be submitted (the ring has big SQEs and CQEs)
        self.passthrough_ring = self.ring.flags == IORING_SETUP_BIG
        self._transfers = [Transfer(i) for i in range(self.ring.sq_entries)]
        self._free = list(reversed(self._transfers))
        self._pool = TransferPool()
        #: submitted and not yet released
        self.in_flight = 0
        #: submitted and not yet reaped: what the kernel still owes a completion for
        self._outstanding = 0
        #: transfers sent O_DIRECT (the others went through the host's page cache)
        self.direct = 0

    def readv(
        self, backend: Any, offset: int, views: Sequence[memoryview], length: int, context: Any
    ) -> Transfer:
        t = self._submit(IORING_OP_READV, backend, offset, views, 0, False)
        if t is None:
            t = self._pool.take()
            t.backend, t.offset, t.views, t.write = backend, offset, views, False
            t.length, t.context = length, context
            return run_now(t)
        t.length, t.context = length, context
        return t

    def writev(
        self,
        backend: Any,
        offset: int,
        views: Sequence[memoryview],
        length: int,
        fua: bool,
        context: Any,
    ) -> Transfer:
        t = self._submit(IORING_OP_WRITEV, backend, offset, views, RWF_DSYNC if fua else 0, fua)
        if t is None:
            t = self._pool.take()
            t.backend, t.offset, t.views, t.write, t.fua = backend, offset, views, True, fua
            t.length, t.context = length, context
            return run_now(t)
        t.length, t.context = length, context
        return t

    def _submit(
        self,
        opcode: int,
        backend: Any,
        offset: int,
        views: Sequence[memoryview],
        rw_flags: int,
        fua: bool,
    ) -> Transfer | None:
        """Prepare the SQE; None where the transfer must be done at once instead."""
        free = self._free
        count = len(views)
        if not free or count > IOV_MAX:
            return None
        target = getattr(backend, "io_target", None)
        if target is None:
            return None
        where = target()
        if where is None:
            return None
        fd, base, direct_fd, align = where
        buffered_write_in_place = opcode == IORING_OP_WRITEV and not fua
        if buffered_write_in_place and direct_fd < 0:
            return None
        t = free[-1]
        iov = t.iov
        if len(iov) < 2 * count:
            iov = t.iov = (ctypes.c_uint64 * (2 * count))()
        at = base + offset
        bits = at  # every address, length and the offset: O_DIRECT wants them all aligned
        try:
            i = 0
            for view in views:
                address = iov[i] = _addressof(_c_char.from_buffer(view))
                nbytes = iov[i + 1] = view.nbytes
                bits |= address | nbytes
                i += 2
        except (TypeError, ValueError):
            return None  # read-only or empty buffers: the synchronous path copes
        if direct_fd >= 0 and not bits & (align - 1):
            fd = direct_fd  # past the host's page cache; the rest goes through it
            self.direct += 1
        elif buffered_write_in_place:
            return None
        free.pop()
        self.ring.prep(opcode, fd, _addressof(iov), count, at, rw_flags, t.index)
        t.backend = backend
        t.offset = offset
        t.views = views  # the guest memory stays referenced until the kernel is done
        t.write = opcode == IORING_OP_WRITEV
        t.fua = fua
        t.submitted = True
        self.in_flight += 1
        self._outstanding += 1
        return t

    def passthrough(
        self, backend: Any, dw: tuple[int, ...], views: Sequence[memoryview], context: Any
    ) -> Transfer:
        t = self._submit_passthrough(backend, dw, views)
        if t is None:
            t = self._pool.take()
            t.backend, t.dw, t.views, t.passthrough = backend, dw, views, True
            t.context = context
            return run_now(t)
        t.dw, t.context = dw, context
        return t

    def _submit_passthrough(
        self, backend: Any, dw: tuple[int, ...], views: Sequence[memoryview]
    ) -> Transfer | None:
        free = self._free
        if not self.passthrough_ring or not free or len(views) > IOV_MAX:
            return None
        t = free[-1]
        try:
            cmd, vectored, t.iov = passthrough.encode(dw, backend.host_nsid, views, t.iov)
        except (TypeError, ValueError):
            return None  # read-only buffers: the synchronous path says why
        free.pop()
        cmd_op = passthrough.NVME_URING_CMD_IO_VEC if vectored else passthrough.NVME_URING_CMD_IO
        self.ring.prep_uring_cmd(backend.fd, cmd_op, cmd, t.index)
        t.backend = backend
        t.views = views  # the guest memory stays referenced until the kernel is done
        t.passthrough = True
        t.write = False
        t.submitted = True
        self.in_flight += 1
        self._outstanding += 1
        return t

    def submit(self) -> None:
        self.ring.submit()

    def reap(self, wait: bool = False) -> list[Transfer]:
        """Submitted transfers that ended (`result` set: bytes moved, or -errno). With
        `wait`, block until at least one does if any is in flight."""
        done = self.ring.completions32()
        if not done and wait and self._outstanding:
            self.ring.submit(wait=1)
            done = self.ring.completions32()
        self._outstanding -= len(done)
        transfers = self._transfers
        out = []
        for user_data, res, dw0 in done:
            t = transfers[user_data]
            t.result = res
            t.dw0 = dw0
            out.append(t)
        return out

    def wait(self, timeout_ns: int) -> None:
        if self._outstanding:
            self.ring.submit()  # (nothing, normally: each pass submits what it queued)
            self.ring.wait(1, timeout_ns)

    def release(self, t: Transfer) -> None:
        """The transfer is finished with: its slot and buffers go back."""
        if t.index < 0:
            self._pool.give(t)
            return
        t.clear()
        self._free.append(t)
        self.in_flight -= 1

    def close(self) -> None:
        self.ring.close()
