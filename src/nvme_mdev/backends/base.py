"""The backend interface: moves bytes between host storage and guest buffers.

A backend is a byte-addressed slice of host storage. Offsets are relative to the
start of the slice; the namespace has already checked that every access lies
inside it. Buffers are memoryviews straight into mmap'd guest memory (zero copy).
Errors are raised as OSError and turned into NVMe status codes by the caller
(nvme/media_errors.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple, Protocol


class IoTarget(NamedTuple):
    """Where an engine that does its own reads and writes (io_uring) sends them."""

    fd: int
    #: offset of the backend's byte 0 in fd (a window's start)
    base: int
    #: the same storage opened O_DIRECT, for transfers aligned to `direct_align`; -1: none
    direct_fd: int = -1
    #: what O_DIRECT needs: buffer addresses, lengths and offsets multiples of it
    direct_align: int = 0


class Backend(Protocol):
    #: size of the slice in bytes
    size: int
    #: logical block size the storage itself needs for direct I/O (1 for buffered files)
    block_size: int
    readonly: bool
    #: what the user named, for messages and the serial/model strings
    description: str

    def readv(self, offset: int, buffers: Sequence[memoryview]) -> None:
        """Fill the buffers, in order, from [offset, offset + total length)."""
        ...

    def writev(self, offset: int, buffers: Sequence[memoryview], fua: bool) -> None:
        """Write the buffers, in order; with fua the data is durable on return."""
        ...

    def flush(self) -> None:
        """Make every completed write durable."""
        ...

    def write_zeroes(self, offset: int, length: int, deallocate: bool) -> None:
        """Make [offset, offset+length) read as zeroes; may release the space if deallocate."""
        ...

    def deallocate(self, offset: int, length: int) -> None:
        """Advisory: release the space (punch a hole / discard). Data then reads as zeroes."""
        ...

    def store_size(self) -> int:
        """Bytes the storage under the slice holds now: a file's length, a block
        device's capacity; a window's whole file or device. OSError if it cannot be
        asked (a device that went away)."""
        ...

    def current_size(self) -> int:
        """The slice's size as the storage is now (a rescan): store_size() for a whole
        file or device. A window keeps its size (or runs to the end, if it was given no
        size) and raises BackendError if it no longer lies inside its store."""
        ...

    def io_target(self) -> IoTarget | None:
        """Where an engine that does its own reads and writes (io_uring) sends them;
        None: only readv/writev reach the storage."""
        ...

    def close(self) -> None: ...
