"""The guest-memory interface the NVMe controller does its DMA through.

The transport implements it (guest RAM mmap'd from the fds of DMA_MAP, or
DMA_READ/DMA_WRITE messages when the client sent no fd); tests implement it
with a bytearray. The controller never learns which.
"""

from __future__ import annotations

import struct
import sys
from dataclasses import dataclass
from typing import Protocol

# Guest memory is little-endian, and words32() relies on the native "I" being its u32.
if sys.byteorder != "little" or struct.calcsize("I") != 4:
    raise ImportError("nvme-mdev needs a little-endian host with a 4-byte C unsigned int")


def words32(view: memoryview) -> memoryview:
    """`view` (4-byte aligned, a multiple of 4 long) as native 32-bit words.

    Memory that another party polls (a CQE's phase dword, a doorbell) is stored through
    this: assigning an item is one aligned 4-byte store, seen whole by a poller on another
    CPU. struct.pack_into is not safe there: it zeroes its target before storing the value,
    and a guest polling a CQ whose expected phase is 0 takes that transient zero for a
    completion of command ID 0, then misses the real one.
    """
    return view.cast("I")


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

    def mapped_regions(self) -> list[MappedRegion]:
        """The regions as (guest address, size, buffer, readable, writable), the buffer
        a zero-copy view of the whole region, or None where it is reached through
        read()/write() only: what the native data plane maps (dataplane/native.py)."""
        ...


#: (guest address, size, buffer or None, readable, writable)
MappedRegion = tuple[int, int, "memoryview | None", bool, bool]


@dataclass(frozen=True)
class MemoryChange:
    """What one DMA_MAP or DMA_UNMAP changed in the region table, so that a copy of it
    (the native data plane's) follows in O(log n), not by reading it all again."""

    mapped: tuple[MappedRegion, ...] = ()
    #: the guest addresses of the regions removed
    unmapped: tuple[int, ...] = ()
