"""What the vfio-user server serves: a device seen as regions and interrupts.

The server owns the socket and guest memory; the device (our PCI function) owns
the meaning of region accesses and interrupts. Both sides stay free of each other's
details: the server never parses config space, the device never parses messages.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Protocol


class RegionIndex(IntEnum):
    BAR0 = 0
    BAR1 = 1
    BAR2 = 2
    BAR3 = 3
    BAR4 = 4
    BAR5 = 5
    ROM = 6
    CONFIG = 7
    VGA = 8


class IrqIndex(IntEnum):
    INTX = 0
    MSI = 1
    MSIX = 2
    ERR = 3
    REQ = 4


class IrqAction(IntEnum):
    MASK = 0
    UNMASK = 1
    TRIGGER = 2


class DeviceError(Exception):
    """A request the device refuses; the server replies with this errno."""

    def __init__(self, errno: int, message: str = "") -> None:
        super().__init__(message or f"errno {errno}")
        self.errno = errno


@dataclass(frozen=True)
class MmapArea:
    offset: int
    size: int


@dataclass
class Region:
    index: int
    size: int
    read: bool = True
    write: bool = True
    #: fd backing the mmap-able parts (sparse areas relative to the region start)
    mmap_fd: int | None = None
    mmap_areas: Sequence[MmapArea] = field(default_factory=tuple)


@dataclass(frozen=True)
class IrqSet:
    """One SET_IRQS request, decoded."""

    index: int
    action: IrqAction
    start: int
    count: int
    #: DATA_EVENTFD: one fd per vector (-1 detaches it); the device owns them after the call
    fds: Sequence[int] | None = None
    #: DATA_BOOL: one flag per vector
    flags: Sequence[bool] | None = None


class Device(Protocol):
    regions: Sequence[Region]
    #: vectors per IRQ index (INTx, MSI, MSI-X, ERR, REQ)
    irq_counts: Sequence[int]

    def region_read(self, index: int, offset: int, count: int) -> bytes: ...

    def region_write(self, index: int, offset: int, data: bytes) -> None: ...

    def set_irqs(self, request: IrqSet) -> None: ...

    def reset(self) -> None:
        """DEVICE_RESET, and the client going away: back to power-on state."""
        ...

    def quiesced(self) -> contextlib.AbstractContextManager[None]:
        """Held by the server while it removes guest-memory mappings, so that no
        DMA is in progress through them."""
        ...


@contextlib.contextmanager
def no_quiesce() -> Iterator[None]:
    yield
