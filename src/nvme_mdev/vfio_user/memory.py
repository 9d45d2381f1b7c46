"""Guest memory as the client maps it for DMA (DMA_MAP / DMA_UNMAP).

Regions that come with a file descriptor are mmap'd, so the device reads and
writes guest RAM in place (zero copy). Regions without one are reached with
DMA_READ / DMA_WRITE messages through the connection. Lookups take no lock: the
region table is replaced whole on every change, and unmapping happens while the
device is quiesced (see VfioUserServer), so no view outlives its mapping.
"""

from __future__ import annotations

import bisect
import errno
import logging
import mmap
import os
from collections.abc import Callable
from dataclasses import dataclass, field

from ..guest_memory import DmaError
from .protocol import ProtocolError

log = logging.getLogger(__name__)

DmaReader = Callable[[int, int], bytes]
DmaWriter = Callable[[int, bytes | bytearray | memoryview], None]


@dataclass(eq=False)
class DmaRegion:
    iova: int
    size: int
    readable: bool
    writable: bool
    mapping: mmap.mmap | None = None
    #: where the guest range starts inside `mapping` (the fd offset rounded down to a page)
    delta: int = 0
    view: memoryview | None = field(default=None, repr=False)

    @property
    def end(self) -> int:
        return self.iova + self.size

    def close(self) -> None:
        if self.view is not None:
            self.view.release()
            self.view = None
        if self.mapping is not None:
            try:
                self.mapping.close()
            except BufferError:
                # A view is still exported somewhere; the mapping goes when it does.
                log.warning("DMA region %#x+%#x unmapped while still in use", self.iova, self.size)
            self.mapping = None


class DmaMemory:
    """Implements nvme_mdev.guest_memory.GuestMemory over the client's DMA regions."""

    def __init__(self, max_regions: int = 65535) -> None:
        self.max_regions = max_regions
        self._regions: tuple[DmaRegion, ...] = ()
        self._starts: tuple[int, ...] = ()
        #: set by the server while a client that can answer DMA_READ/DMA_WRITE is connected
        self.dma_read: DmaReader | None = None
        self.dma_write: DmaWriter | None = None

    # --- DMA_MAP / DMA_UNMAP (server thread) ------------------------------------

    def add(
        self, iova: int, size: int, readable: bool, writable: bool, fd: int | None, offset: int
    ) -> None:
        """Map [iova, iova+size). Takes ownership of fd (closed here)."""
        try:
            if size <= 0 or iova < 0 or iova + size > 1 << 64:
                raise ProtocolError(errno.EINVAL, f"DMA_MAP {iova:#x}+{size:#x}: bad range")
            if len(self._regions) >= self.max_regions:
                raise ProtocolError(errno.ENOSPC, "too many DMA regions")
            if self._overlapping(iova, size):
                raise ProtocolError(errno.EEXIST, f"DMA_MAP {iova:#x}+{size:#x} overlaps")
            region = DmaRegion(iova, size, readable, writable)
            if fd is not None:
                start = offset - offset % mmap.ALLOCATIONGRANULARITY
                region.delta = offset - start
                prot = (mmap.PROT_READ if readable else 0) | (mmap.PROT_WRITE if writable else 0)
                try:
                    region.mapping = mmap.mmap(
                        fd, size + region.delta, mmap.MAP_SHARED, prot or mmap.PROT_READ,
                        offset=start,
                    )
                except (OSError, ValueError) as exc:
                    err = exc.errno if isinstance(exc, OSError) and exc.errno else errno.EINVAL
                    raise ProtocolError(err, f"DMA_MAP {iova:#x}: mmap: {exc}") from exc
                region.view = memoryview(region.mapping)
                if not writable:
                    region.view = region.view.toreadonly()
        finally:
            if fd is not None:
                os.close(fd)
        regions = sorted((*self._regions, region), key=lambda r: r.iova)
        self._publish(regions)

    def remove(self, iova: int, size: int, everything: bool = False) -> list[DmaRegion]:
        """Unmap whole regions inside [iova, iova+size); the caller closes them once
        the device no longer uses them."""
        if everything:
            removed = list(self._regions)
        else:
            removed = [r for r in self._regions if r.iova >= iova and r.end <= iova + size]
            partial = [r for r in self._overlapping(iova, size) if r not in removed]
            if partial:
                raise ProtocolError(errno.EINVAL, f"DMA_UNMAP {iova:#x}+{size:#x} splits a region")
            if not removed:
                raise ProtocolError(errno.ENOENT, f"DMA_UNMAP {iova:#x}+{size:#x}: not mapped")
        self._publish([r for r in self._regions if r not in removed])
        return removed

    def clear(self) -> list[DmaRegion]:
        return self.remove(0, 0, everything=True)

    def _publish(self, regions: list[DmaRegion]) -> None:
        # Readers may run concurrently: swap both tables in one step.
        self._regions, self._starts = tuple(regions), tuple(r.iova for r in regions)

    def _overlapping(self, iova: int, size: int) -> list[DmaRegion]:
        return [r for r in self._regions if r.iova < iova + size and iova < r.end]

    @property
    def regions(self) -> tuple[DmaRegion, ...]:
        return self._regions

    # --- GuestMemory --------------------------------------------------------------

    def _find(self, addr: int) -> DmaRegion | None:
        regions = self._regions
        i = bisect.bisect_right(self._starts, addr) - 1
        if i >= 0:
            region = regions[i]
            if addr < region.end:
                return region
        return None

    def view(self, addr: int, length: int, writable: bool) -> memoryview | None:
        region = self._find(addr)
        if region is None:
            raise DmaError(f"{addr:#x} is not mapped for DMA")
        if addr + length > region.end:
            self._check_range(addr, length, writable)
            return None  # spans regions: read()/write() handle it piece by piece
        if writable and not region.writable:
            raise DmaError(f"{addr:#x} is mapped read-only")
        if region.view is None:
            return None
        start = addr - region.iova + region.delta
        return region.view[start : start + length]

    def _check_range(self, addr: int, length: int, writable: bool) -> None:
        for _, _, region in self._pieces(addr, length):
            if writable and not region.writable:
                raise DmaError(f"{addr:#x} is mapped read-only")

    def _pieces(self, addr: int, length: int) -> list[tuple[int, int, DmaRegion]]:
        pieces = []
        while length > 0:
            region = self._find(addr)
            if region is None:
                raise DmaError(f"{addr:#x} is not mapped for DMA")
            n = min(length, region.end - addr)
            pieces.append((addr, n, region))
            addr += n
            length -= n
        return pieces

    def read(self, addr: int, length: int) -> bytes:
        out = []
        for piece_addr, n, region in self._pieces(addr, length):
            if not region.readable:
                raise DmaError(f"{piece_addr:#x} is not readable")
            if region.view is not None:
                start = piece_addr - region.iova + region.delta
                out.append(bytes(region.view[start : start + n]))
            else:
                out.append(self._message_read(piece_addr, n))
        return b"".join(out)

    def write(self, addr: int, data: bytes | bytearray | memoryview) -> None:
        pos = 0
        for piece_addr, n, region in self._pieces(addr, len(data)):
            if not region.writable:
                raise DmaError(f"{piece_addr:#x} is mapped read-only")
            chunk = data[pos : pos + n]
            if region.view is not None:
                start = piece_addr - region.iova + region.delta
                region.view[start : start + n] = chunk
            else:
                self._message_write(piece_addr, chunk)
            pos += n

    def _message_read(self, addr: int, length: int) -> bytes:
        reader = self.dma_read
        if reader is None:
            raise DmaError("no client to carry DMA_READ")
        try:
            return reader(addr, length)
        except (OSError, ProtocolError, TimeoutError) as exc:
            raise DmaError(f"DMA_READ {addr:#x}+{length:#x}: {exc}") from exc

    def _message_write(self, addr: int, data: bytes | bytearray | memoryview) -> None:
        writer = self.dma_write
        if writer is None:
            raise DmaError("no client to carry DMA_WRITE")
        try:
            writer(addr, data)
        except (OSError, ProtocolError, TimeoutError) as exc:
            raise DmaError(f"DMA_WRITE {addr:#x}+{len(data):#x}: {exc}") from exc
