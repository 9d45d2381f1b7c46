"""A fake Device for the vfio-user server tests: a bytearray-backed BAR0 (with a
memfd-backed, mmap-able doorbell page), BAR4 and a config region, and a record
of everything the server asked of it."""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import threading
from collections.abc import Callable, Iterator, Sequence

from nvme_mdev.vfio_user.device import (
    DeviceError,
    IrqSet,
    MmapArea,
    Region,
    RegionIndex,
)

BAR0_SIZE = 0x4000
BAR4_SIZE = 0x2000
CONFIG_SIZE = 4096
MSIX_VECTORS = 20
DOORBELL_PAGE = MmapArea(0x1000, 0x1000)


class FakeDevice:
    """Implements vfio_user.device.Device."""

    def __init__(self, irq_info_flags: Sequence[int] | None = None) -> None:
        self.memfd = os.memfd_create("fake-bar0", os.MFD_CLOEXEC)
        os.ftruncate(self.memfd, BAR0_SIZE)
        self.shared = mmap.mmap(self.memfd, BAR0_SIZE)
        self.bars: dict[int, bytearray] = {
            RegionIndex.BAR0: bytearray(BAR0_SIZE),
            RegionIndex.BAR4: bytearray(BAR4_SIZE),
            RegionIndex.CONFIG: bytearray(CONFIG_SIZE),
        }
        self.bars[RegionIndex.CONFIG][0:4] = b"\x36\x1b\x10\x00"
        sizes = {i: len(b) for i, b in self.bars.items()}
        self.regions: Sequence[Region] = tuple(
            Region(index=i, size=sizes.get(i, 0), read=i in sizes, write=i in sizes)
            for i in range(len(RegionIndex))
        )
        self.regions[RegionIndex.BAR0].mmap_fd = self.memfd
        self.regions[RegionIndex.BAR0].mmap_areas = (DOORBELL_PAGE,)
        self.irq_counts: Sequence[int] = (1, 0, MSIX_VECTORS, 0, 0)
        if irq_info_flags is not None:
            self.irq_info_flags = irq_info_flags
        self.lock = threading.Lock()
        self.irq_requests: list[IrqSet] = []
        #: vector -> fd the device holds (it owns them)
        self.fds: dict[tuple[int, int], int] = {}
        self.writes: list[tuple[int, int, bytes]] = []
        self.resets = 0
        self.quiesces = 0
        self.reset_event = threading.Event()
        self.quiesce_lock = threading.Lock()
        #: called on every region write (tests hook device behaviour in here)
        self.on_write: Callable[[int, int, bytes], None] | None = None

    # --- Device ------------------------------------------------------------------------

    def region_read(self, index: int, offset: int, count: int) -> bytes:
        bar = self._bar(index, offset, count)
        return bytes(bar[offset : offset + count])

    def region_write(self, index: int, offset: int, data: bytes) -> None:
        bar = self._bar(index, offset, len(data))
        with self.lock:
            self.writes.append((index, offset, data))
        bar[offset : offset + len(data)] = data
        if self.on_write is not None:
            self.on_write(index, offset, data)

    def set_irqs(self, request: IrqSet) -> None:
        with self.lock:
            self.irq_requests.append(request)
            if request.fds is not None:
                for vector, fd in enumerate(request.fds, request.start):
                    old = self.fds.pop((request.index, vector), -1)
                    if old >= 0:
                        os.close(old)
                    if fd >= 0:
                        self.fds[(request.index, vector)] = fd
            elif request.count == 0:
                for key in [k for k in self.fds if k[0] == request.index]:
                    os.close(self.fds.pop(key))

    def reset(self) -> None:
        with self.lock:
            self.resets += 1
            for fd in self.fds.values():
                os.close(fd)
            self.fds.clear()
        self.reset_event.set()

    @contextlib.contextmanager
    def _quiesced(self) -> Iterator[None]:
        with self.lock:
            self.quiesces += 1
        with self.quiesce_lock:  # what the device's I/O thread holds while it works
            yield

    def quiesced(self) -> contextlib.AbstractContextManager[None]:
        return self._quiesced()

    # --- helpers -----------------------------------------------------------------------

    def _bar(self, index: int, offset: int, count: int) -> bytearray:
        bar = self.bars.get(index)
        if bar is None or offset < 0 or offset + count > len(bar):
            raise DeviceError(errno.EINVAL, f"region {index}: {offset:#x}+{count}")
        return bar

    def signal(self, index: int, vector: int) -> None:
        with self.lock:
            fd = self.fds[(index, vector)]
        os.eventfd_write(fd, 1)

    def close(self) -> None:
        self.reset()
        self.shared.close()
        os.close(self.memfd)
