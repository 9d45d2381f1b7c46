"""Shared fakes for the PCI function tests."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

from nvme_mdev.pci.function import NvmePciFunction
from nvme_mdev.vfio_user.device import IrqAction, IrqIndex, IrqSet, RegionIndex

BAR0_SIZE = 0x4000
VECTORS = 8


class FakeBar0:
    """Records every access; reads return a recognisable pattern."""

    def __init__(self) -> None:
        self.reads: list[tuple[int, int]] = []
        self.writes: list[tuple[int, int, int]] = []
        self.resets = 0

    def mmio_read(self, offset: int, size: int) -> int:
        self.reads.append((offset, size))
        # byte at address a reads as (a & 0xff): easy to check reassembly
        return int.from_bytes(bytes((offset + i) & 0xFF for i in range(size)), "little")

    def mmio_write(self, offset: int, size: int, value: int) -> None:
        self.writes.append((offset, size, value))

    def reset(self) -> None:
        self.resets += 1


def make_function(vectors: int = VECTORS) -> tuple[NvmePciFunction, FakeBar0]:
    bar0 = FakeBar0()
    return NvmePciFunction(bar0, BAR0_SIZE, vectors), bar0


def cfg_read(fn: NvmePciFunction, offset: int, size: int) -> int:
    return int.from_bytes(fn.region_read(RegionIndex.CONFIG, offset, size), "little")


def cfg_write(fn: NvmePciFunction, offset: int, size: int, value: int) -> None:
    fn.region_write(RegionIndex.CONFIG, offset, value.to_bytes(size, "little"))


def eventfd() -> int:
    return os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)


def fired(fd: int) -> int:
    """How many signals the eventfd got since last asked (0 if none)."""
    try:
        return os.eventfd_read(fd)
    except BlockingIOError:
        return 0


def is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def set_eventfds(fn: NvmePciFunction, index: int, start: int, fds: list[int]) -> None:
    fn.set_irqs(IrqSet(index, IrqAction.TRIGGER, start, len(fds), fds=fds))


def irq(
    index: IrqIndex,
    action: IrqAction,
    start: int = 0,
    count: int = 1,
    flags: list[bool] | None = None,
) -> IrqSet:
    return IrqSet(index, action, start, count, flags=flags)


@contextmanager
def eventfds(n: int) -> Iterator[list[int]]:
    """Eventfds for the test to read; the device gets dup()s it will own and close."""
    fds = [eventfd() for _ in range(n)]
    try:
        yield fds
    finally:
        for fd in fds:
            os.close(fd)
