"""I/O engines: how a Read's or Write's data transfer is executed.

The controller hands each Read and Write to its engine. The synchronous engine
takes none of them: the command set then calls the backend's preadv/pwritev itself,
and the command completes in the same pass. An asynchronous engine (io_uring,
uring.py) queues the transfer and returns a Request; the I/O thread submits what a
pass queued in one system call, and completes each command when its Request comes
back from reap(). Everything else (Flush, Write Zeroes, DSM, Compare, Verify, Copy)
stays synchronous.

Selection (`--io-engine`): `auto` is io_uring where the kernel allows it, else
synchronous (logged once); `sync` and `uring` force one.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Final, Protocol

log = logging.getLogger(__name__)

ENGINE_NAMES: Final = ("auto", "sync", "uring")
#: iovecs one readv/writev takes (UIO_MAXIOV); more is EINVAL
IOV_MAX: Final = 1024


class Request:
    """One transfer handed to an asynchronous engine, from queueing to reaping.
    Pre-allocated per ring slot and reused: the hot path allocates none."""

    __slots__ = (
        "backend",
        "dw",
        "dw0",
        "fua",
        "index",
        "iov",
        "length",
        "offset",
        "owner",
        "passthrough",
        "result",
        "seen",
        "views",
        "write",
    )

    def __init__(self, index: int) -> None:
        #: the user_data token that names it in the ring
        self.index = index
        self.iov: Any = ()  # a ctypes u64 array: (address, length) pairs
        self.backend: Any = None
        self.offset = 0
        self.length = 0
        #: the guest buffers, referenced until the kernel is done with them
        self.views: Sequence[memoryview] = ()
        self.write = False
        self.fua = False
        #: bytes transferred, or -errno; for a passthrough command 0, -errno, or the
        #: host's NVMe Status Field (> 0)
        self.result = 0
        #: a NVMe command passed through to the host (not a read or write of bytes)
        self.passthrough = False
        #: a passthrough command's completion Dword 0, from the host (else 0)
        self.dw0 = 0
        # The command's context, the controller's to fill: its dwords, its submission
        # queue (typed loosely: backends know nothing of queues), when it was fetched.
        self.dw: tuple[int, ...] = ()
        self.owner: Any = None
        self.seen = 0


class IoEngine(Protocol):
    #: "sync" or "uring", for statistics and logs
    name: str
    #: requests queued or submitted and not yet released
    in_flight: int

    def queue_readv(self, backend: Any, offset: int, views: Sequence[memoryview]) -> Request | None:
        """Queue a read into `views`; None: declined, the caller reads synchronously."""
        ...

    def queue_writev(
        self, backend: Any, offset: int, views: Sequence[memoryview], fua: bool
    ) -> Request | None:
        """Queue a write from `views` (durable before it completes with `fua`);
        None: declined, the caller writes synchronously."""
        ...

    def queue_passthrough(
        self, backend: Any, dw: tuple[int, ...], views: Sequence[memoryview]
    ) -> Request | None:
        """Queue the guest's NVMe command `dw` (checked) to a passthrough backend's host
        namespace, with its data in `views`; None: declined, the caller runs it
        synchronously (backend.execute)."""
        ...

    def submit(self) -> None:
        """Hand everything queued since the last submit to the kernel, in one call."""
        ...

    def reap(self, wait: bool = False) -> list[Request]:
        """Requests whose transfer ended; with `wait`, block for one if any is in flight.
        Each goes back with release() once its command is completed."""
        ...

    def wait(self, timeout_ns: int) -> None:
        """Block until a transfer in flight ends or `timeout_ns` passes."""
        ...

    def release(self, req: Request) -> None: ...

    def close(self) -> None: ...


class SyncEngine:
    """Takes nothing: every transfer runs synchronously inside the command."""

    name = "sync"
    in_flight = 0

    def queue_readv(self, backend: Any, offset: int, views: Sequence[memoryview]) -> Request | None:
        return None

    def queue_writev(
        self, backend: Any, offset: int, views: Sequence[memoryview], fua: bool
    ) -> Request | None:
        return None

    def queue_passthrough(
        self, backend: Any, dw: tuple[int, ...], views: Sequence[memoryview]
    ) -> Request | None:
        return None

    def submit(self) -> None:
        pass

    def reap(self, wait: bool = False) -> list[Request]:
        return []

    def wait(self, timeout_ns: int) -> None:
        pass

    def release(self, req: Request) -> None:
        pass

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
