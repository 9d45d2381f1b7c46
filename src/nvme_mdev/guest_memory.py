"""The guest-memory interface the NVMe controller does its DMA through.

The transport implements it (guest RAM mmap'd from the fds of DMA_MAP, or
DMA_READ/DMA_WRITE messages when the client sent no fd); tests implement it
with a bytearray. The controller never learns which.
"""

from __future__ import annotations

from typing import Protocol


class DmaError(Exception):
    """The guest named an address range that is not mapped (or not with the needed access)."""


class GuestMemory(Protocol):
    def view(self, addr: int, length: int, writable: bool) -> memoryview | None:
        """A zero-copy view of guest memory [addr, addr+length), or None where the range
        can only be reached through read()/write() (message-based DMA).

        Raises DmaError if the range is not mapped, or not writable when asked to be.
        The view is valid until the next DMA_UNMAP, which the transport serialises
        against the controller's I/O (see engine quiesce).
        """
        ...

    def read(self, addr: int, length: int) -> bytes:
        """Copy guest memory out. Raises DmaError."""
        ...

    def write(self, addr: int, data: bytes | bytearray | memoryview) -> None:
        """Copy into guest memory. Raises DmaError."""
        ...
