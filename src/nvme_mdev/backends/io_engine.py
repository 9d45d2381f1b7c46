"""I/O engines: how a Read's or Write's data transfer is executed.

The I/O command set hands each Read's and Write's data transfer (and each NVMe
passthrough command) to its engine, which returns a `Transfer` either done (the
synchronous engine always; io_uring when it cannot take one) or submitted (io_uring:
many in flight, a pass's worth submitted in one system call). Both kinds end in the
same place, IoCommandSet.finish(), which turns the result into the command's
completion: one path whichever engine ran it, as firecracker's block device engines
answer Executed or Submitted. Everything else (Flush, Write Zeroes, DSM, Compare,
Verify, Copy) is synchronous.

Selection (`--io-engine`): `auto` is io_uring where the kernel allows it, else
synchronous (logged once); `sync` and `uring` force one.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Sequence
from typing import Any, Final, Protocol

log = logging.getLogger(__name__)

ENGINE_NAMES: Final = ("auto", "sync", "uring")
#: iovecs one readv/writev takes (UIO_MAXIOV); more is EINVAL
IOV_MAX: Final = 1024


class Transfer:
    """One Read's, Write's or passthrough command's data transfer, from the engine's
    point of view: what to move where, and how it ended. Done at once (`submitted`
    False: `result` is set) or submitted to the kernel (it comes back from reap()).
    The command it belongs to is the caller's `context`, carried through untouched.
    An engine keeps a pool of them and reuses each after release(): the hot path
    allocates none."""

    __slots__ = (
        "backend",
        "context",
        "dw",
        "dw0",
        "error",
        "fua",
        "index",
        "iov",
        "length",
        "offset",
        "passthrough",
        "result",
        "submitted",
        "views",
        "write",
    )

    def __init__(self, index: int) -> None:
        #: the user_data token that names it in a ring (-1: not in one)
        self.index = index
        self.iov: Any = ()  # a ctypes u64 array: (address, length) pairs
        self.backend: Any = None
        self.offset = 0
        #: bytes the command moves (statistics and SMART)
        self.length = 0
        #: the guest buffers, referenced until the kernel is done with them
        self.views: Sequence[memoryview] = ()
        self.write = False
        self.fua = False
        #: a NVMe command passed through to the host (not a read or write of bytes)
        self.passthrough = False
        #: the passthrough command's dwords
        self.dw: tuple[int, ...] = ()
        #: submitted to the kernel: it comes back from reap()
        self.submitted = False
        #: bytes transferred, or -errno; for a passthrough command 0, -errno, or the
        #: host's NVMe Status Field (> 0)
        self.result = 0
        #: the backend's own exception, when it ran synchronously and failed
        self.error: OSError | None = None
        #: a passthrough command's completion Dword 0, from the host (else 0)
        self.dw0 = 0
        #: the caller's: the command this transfer belongs to
        self.context: Any = None

    def clear(self) -> None:
        self.views = ()
        self.backend = None
        self.context = None
        self.passthrough = False
        self.submitted = False
        self.error = None
        self.dw0 = 0
        self.dw = ()


def run_now(t: Transfer) -> Transfer:
    """Do the transfer synchronously, through the backend's own calls: `result` is
    the length, the host's status (passthrough), or -errno with `error` kept."""
    try:
        if t.passthrough:
            t.result, t.dw0 = t.backend.execute(t.dw, t.views)
        elif t.write:
            t.backend.writev(t.offset, t.views, t.fua)
            t.result = t.length
        else:
            t.backend.readv(t.offset, t.views)
            t.result = t.length
    except OSError as exc:
        t.error = exc
        t.result = -(exc.errno or errno.EIO)
    except TypeError:  # read-only guest memory handed to a passthrough command
        t.result = -errno.EFAULT
    t.submitted = False
    return t


class IoEngine(Protocol):
    #: "sync" or "uring", for statistics and logs
    name: str
    #: transfers submitted and not yet released
    in_flight: int

    def readv(
        self, backend: Any, offset: int, views: Sequence[memoryview], length: int, context: Any
    ) -> Transfer:
        """Read [offset, offset + length) into `views`: done now, or submitted."""
        ...

    def writev(
        self,
        backend: Any,
        offset: int,
        views: Sequence[memoryview],
        length: int,
        fua: bool,
        context: Any,
    ) -> Transfer:
        """Write `views` at `offset` (durable before it completes with `fua`): done
        now, or submitted."""
        ...

    def passthrough(
        self, backend: Any, dw: tuple[int, ...], views: Sequence[memoryview], context: Any
    ) -> Transfer:
        """The guest's NVMe command `dw` (checked) to a passthrough backend's host
        namespace, with its data in `views`: done now, or submitted."""
        ...

    def submit(self) -> None:
        """Hand everything submitted since the last call to the kernel, in one call."""
        ...

    def reap(self, wait: bool = False) -> list[Transfer]:
        """Submitted transfers that ended; with `wait`, block for one if any is in
        flight. Each goes back with release() once its command is completed."""
        ...

    def wait(self, timeout_ns: int) -> None:
        """Block until a transfer in flight ends or `timeout_ns` passes."""
        ...

    def release(self, t: Transfer) -> None: ...

    def close(self) -> None: ...


class TransferPool:
    """Transfers that run synchronously: taken, done and released within one command."""

    def __init__(self) -> None:
        self._free: list[Transfer] = []

    def take(self) -> Transfer:
        return self._free.pop() if self._free else Transfer(-1)

    def give(self, t: Transfer) -> None:
        t.clear()
        self._free.append(t)


class SyncEngine:
    """Every transfer runs at once, inside the command, through the backend."""

    name = "sync"
    in_flight = 0

    def __init__(self) -> None:
        self._pool = TransferPool()

    def readv(
        self, backend: Any, offset: int, views: Sequence[memoryview], length: int, context: Any
    ) -> Transfer:
        t = self._pool.take()
        t.backend, t.offset, t.views, t.length, t.write = backend, offset, views, length, False
        t.context = context
        return run_now(t)

    def writev(
        self,
        backend: Any,
        offset: int,
        views: Sequence[memoryview],
        length: int,
        fua: bool,
        context: Any,
    ) -> Transfer:
        t = self._pool.take()
        t.backend, t.offset, t.views, t.length, t.write = backend, offset, views, length, True
        t.fua, t.context = fua, context
        return run_now(t)

    def passthrough(
        self, backend: Any, dw: tuple[int, ...], views: Sequence[memoryview], context: Any
    ) -> Transfer:
        t = self._pool.take()
        t.backend, t.dw, t.views, t.passthrough, t.context = backend, dw, views, True, context
        return run_now(t)

    def submit(self) -> None:
        pass

    def reap(self, wait: bool = False) -> list[Transfer]:
        return []

    def wait(self, timeout_ns: int) -> None:
        pass

    def release(self, t: Transfer) -> None:
        self._pool.give(t)

    def close(self) -> None:
        pass


def make_io_engine(kind: str = "auto") -> IoEngine:
    """The engine `kind` names (ENGINE_NAMES). `uring` where io_uring cannot be used
    raises OSError; `auto` falls back to `sync` and says why, once."""
    if kind == "sync":
        return SyncEngine()
    if kind not in ("auto", "uring"):
        raise ValueError(f"I/O engine {kind!r}: one of {', '.join(ENGINE_NAMES)}")
    from . import uring  # here: ctypes set-up only where io_uring is wanted

    reason = uring.unavailable()
    if reason is None:
        try:
            return uring.UringEngine()
        except OSError as exc:  # e.g. RLIMIT_MEMLOCK on kernels before 5.12
            reason = f"io_uring_setup fails: {exc.strerror or exc}"
    if kind == "uring":
        raise OSError(reason)
    global _fallback_logged
    if not _fallback_logged:
        _fallback_logged = True
        log.info("I/O engine: synchronous reads and writes (%s)", reason)
    return SyncEngine()


_fallback_logged = False
