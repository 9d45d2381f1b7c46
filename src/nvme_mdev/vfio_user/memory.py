"""Guest memory as the client maps it for DMA (DMA_MAP / DMA_UNMAP): implements
`nvme_mdev.guest_memory.GuestMemory` for the controller.

A region that comes with a file descriptor is mmap'd (MAP_SHARED) so the device
reads and writes guest RAM in place: `view()` hands out zero-copy memoryviews. A
region without one is reached with DMA_READ / DMA_WRITE messages through the
connection (`attach()`ed by the server): `view()` returns None there and
`read()` / `write()` copy through messages.

Lookups are the hot path and take no lock: the region table is an immutable
snapshot replaced whole (one attribute store) on every map and unmap; a reader
binds it once and bisects its sorted starts. Unmapping happens while the device
is quiesced (the server holds `Device.quiesced()`), so no view handed out before
outlives its mapping as long as the device drops its views then.

A range that spans two adjacent regions has no single view: `view()` checks it
and returns None, and `read()` / `write()` go region by region.

The client may truncate the file behind a mapping at any time; touching a lost page
raises SIGBUS, which would end the whole daemon. Every mapping is guarded (the native
crate's sigbus.rs): such a fault turns the mapping into zeroes and counts against the
client's memory, and the watcher here tells its owner (the controller goes fatal).
"""

from __future__ import annotations

import bisect
import contextlib
import errno
import logging
import mmap
import os
import select
import threading
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Final, Protocol

from .. import _native
from ..guest_memory import DmaError, MappedRegion, MemoryChange
from .protocol import SERVER_MAX_DMA_MAPS, Bytes, ProtocolError

log = logging.getLogger(__name__)

_PAGE: Final = mmap.ALLOCATIONGRANULARITY


class MessageDma(Protocol):
    """DMA_READ / DMA_WRITE through the connection (the server's session). Both
    raise DmaError when the client refuses or is gone."""

    def dma_read(self, addr: int, length: int) -> bytes: ...

    def dma_write(self, addr: int, data: Bytes) -> None: ...


@dataclass(eq=False)
class DmaRegion:
    iova: int
    size: int
    readable: bool
    writable: bool
    #: the mapping of the client's fd; None: reached through messages
    mapping: mmap.mmap | None = field(default=None, repr=False)
    #: exactly [iova, iova+size) of the mapping (read-only unless writable)
    buffer: memoryview | None = field(default=None, repr=False)
    #: the zone that guards the mapping against SIGBUS, and the mapping's address in it
    guard: tuple[_native.SigbusZone, int] | None = field(default=None, repr=False)
    #: the client's fd and where in it the region starts: kept for a successor process
    #: to map the same memory (upgrade in place)
    fd: int | None = field(default=None, repr=False)
    offset: int = 0

    @property
    def end(self) -> int:
        return self.iova + self.size

    @property
    def fd_backed(self) -> bool:
        return self.mapping is not None

    def close(self) -> None:
        """munmap. A view the device still holds keeps the mapping alive until it
        goes (the quiesce contract says it should not hold any)."""
        if self.buffer is not None:
            self.buffer.release()
            self.buffer = None
        if self.guard is not None:
            zone, address = self.guard
            zone.unguard(address)
            self.guard = None
        if self.mapping is not None:
            try:
                self.mapping.close()
            except BufferError:
                log.warning(
                    "DMA region %#x+%#x unmapped while a view of it is held", self.iova, self.size
                )
            self.mapping = None
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


@dataclass(frozen=True, slots=True)
class _Table:
    starts: tuple[int, ...] = ()
    regions: tuple[DmaRegion, ...] = ()
    message_regions: int = 0


class DmaMemory:
    """The client's DMA regions (GuestMemory). Map and unmap from one thread (the
    server's); view/read/write from any."""

    def __init__(self, max_regions: int = SERVER_MAX_DMA_MAPS) -> None:
        self.max_regions = max_regions
        self._table = _Table()
        self._transport: MessageDma | None = None
        self._lock = threading.Lock()  # serialises writers; readers take none
        #: told after every change of the table (the device's data plane)
        self._listeners: list[Callable[[MemoryChange], None]] = []
        self._zone = _native.SigbusZone()
        self._lost: Callable[[], None] | None = None
        _watcher.watch(self)

    def add_listener(self, changed: Callable[[MemoryChange], None]) -> None:
        """Call `changed(what)` after every map and unmap (an unmap while the device is
        quiesced, before the memory goes)."""
        self._listeners.append(changed)

    def on_lost(self, lost: Callable[[], None]) -> None:
        """Call `lost()` (on the watcher's thread) each time a client has truncated
        memory it mapped and the device touched what is gone: that memory reads as
        zeroes from then on, so whatever uses it must stop (the controller goes fatal)."""
        self._lost = lost

    @property
    def faults(self) -> int:
        """How many mappings faulted so far (each is now zeroes)."""
        return self._zone.faults

    def _changed(self, change: MemoryChange) -> None:
        for changed in self._listeners:
            changed(change)

    # --- DMA_MAP / DMA_UNMAP (server thread) --------------------------------------------

    def map(
        self,
        iova: int,
        size: int,
        readable: bool,
        writable: bool,
        fd: int | None = None,
        offset: int = 0,
    ) -> DmaRegion:
        """Add [iova, iova+size), mmap'd from fd at offset when there is one. Takes
        ownership of fd (kept with the region, closed with it). Raises ProtocolError
        with the errno for the reply."""
        kept = False
        try:
            if size <= 0 or iova < 0 or iova + size > 1 << 64:
                raise ProtocolError(errno.EINVAL, f"DMA_MAP {iova:#x}+{size:#x}: bad range")
            if not (readable or writable):
                raise ProtocolError(errno.EINVAL, f"DMA_MAP {iova:#x}: no access")
            region = DmaRegion(iova, size, readable, writable)
            with self._lock:
                table = self._table
                if len(table.regions) >= self.max_regions:
                    raise ProtocolError(errno.ENOSPC, f"DMA_MAP: {len(table.regions)} regions")
                if _overlapping(table, iova, size):
                    raise ProtocolError(errno.EEXIST, f"DMA_MAP {iova:#x}+{size:#x} overlaps")
                if fd is not None:
                    region.mapping, region.buffer = _mmap(fd, offset, size, readable, writable)
                    region.guard = (self._zone, self._zone.guard(region.mapping))
                    region.fd, region.offset, kept = fd, offset, True
                i = bisect.bisect_left(table.starts, iova)
                self._table = _Table(
                    (*table.starts[:i], iova, *table.starts[i:]),
                    (*table.regions[:i], region, *table.regions[i:]),
                    table.message_regions + (region.mapping is None),
                )
            self._changed(MemoryChange(mapped=(_mapped(region),)))
            return region
        finally:
            if fd is not None and not kept:
                os.close(fd)

    def has_mapping(
        self, iova: int, size: int, readable: bool, writable: bool, fd: int | None, offset: int
    ) -> bool:
        """Whether exactly this mapping is in place: the same range and access, of the
        same file at the same offset (a replayed DMA_MAP: see server.py)."""
        for region in self._table.regions:
            if (region.iova, region.size, region.readable, region.writable) != (
                iova,
                size,
                readable,
                writable,
            ):
                continue
            if fd is None or region.fd is None:
                return fd is None and region.fd is None
            mine, theirs = os.fstat(region.fd), os.fstat(fd)
            same_file = (mine.st_dev, mine.st_ino) == (theirs.st_dev, theirs.st_ino)
            return same_file and region.offset == offset
        return False

    def overlaps(self, iova: int, size: int) -> bool:
        return _overlapping(self._table, iova, size)

    def unmap(self, iova: int, size: int) -> list[DmaRegion]:
        """Remove the region mapped as exactly [iova, iova+size), as the spec asks
        (QEMU unmaps exactly what it mapped). The caller closes it (release())
        once the device no longer uses it."""
        with self._lock:
            table = self._table
            i = bisect.bisect_left(table.starts, iova)
            if i < len(table.regions) and table.regions[i].iova == iova:
                region = table.regions[i]
                if region.size == size:
                    self._table = _Table(
                        (*table.starts[:i], *table.starts[i + 1 :]),
                        (*table.regions[:i], *table.regions[i + 1 :]),
                        table.message_regions - (region.mapping is None),
                    )
                    self._changed(MemoryChange(unmapped=(iova,)))
                    return [region]
            if _overlapping(table, iova, size):
                raise ProtocolError(
                    errno.EINVAL, f"DMA_UNMAP {iova:#x}+{size:#x} is not one whole mapping"
                )
            raise ProtocolError(errno.ENOENT, f"DMA_UNMAP {iova:#x}+{size:#x}: not mapped")

    def unmap_all(self) -> list[DmaRegion]:
        with self._lock:
            removed, self._table = list(self._table.regions), _Table()
        self._changed(MemoryChange(unmapped=tuple(r.iova for r in removed)))
        return removed

    @staticmethod
    def release(regions: Sequence[DmaRegion]) -> None:
        """munmap regions removed by unmap()/unmap_all()."""
        for region in regions:
            region.close()

    def attach(self, transport: MessageDma | None) -> None:
        """Where DMA_READ/DMA_WRITE go (None: no client, message DMA fails)."""
        self._transport = transport

    @property
    def regions(self) -> tuple[DmaRegion, ...]:
        return self._table.regions

    def mapped_regions(self) -> list[MappedRegion]:
        return [_mapped(r) for r in self._table.regions]

    @property
    def has_message_regions(self) -> bool:
        return self._table.message_regions > 0

    # --- GuestMemory -------------------------------------------------------------------

    def view(self, addr: int, length: int, writable: bool) -> memoryview | None:
        table = self._table
        i = bisect.bisect_right(table.starts, addr) - 1
        if i >= 0 and length > 0:
            region = table.regions[i]
            offset = addr - region.iova
            if offset + length <= region.size:
                if not (region.writable if writable else region.readable):
                    raise DmaError(_denied(addr, length, writable))
                buffer = region.buffer
                if buffer is None:
                    return None
                return buffer[offset : offset + length]
        return self._view_slow(addr, length, writable)

    def _view_slow(self, addr: int, length: int, writable: bool) -> memoryview | None:
        if length == 0:
            return memoryview(bytearray()) if writable else memoryview(b"")
        for piece_addr, n, region in self._pieces(addr, length):
            if not (region.writable if writable else region.readable):
                raise DmaError(_denied(piece_addr, n, writable))
        return None  # spans regions: read()/write() go piece by piece

    def read(self, addr: int, length: int) -> bytes:
        table = self._table
        i = bisect.bisect_right(table.starts, addr) - 1
        if i >= 0 and length > 0:
            region = table.regions[i]
            offset = addr - region.iova
            if offset + length <= region.size and region.buffer is not None and region.readable:
                return bytes(region.buffer[offset : offset + length])
        if length == 0:
            return b""
        out = []
        for piece_addr, n, region in self._pieces(addr, length):
            if not region.readable:
                raise DmaError(_denied(piece_addr, n, False))
            if region.buffer is not None:
                offset = piece_addr - region.iova
                out.append(bytes(region.buffer[offset : offset + n]))
            else:
                out.append(self._transport_for(piece_addr).dma_read(piece_addr, n))
        return b"".join(out)

    def write(self, addr: int, data: Bytes) -> None:
        if isinstance(data, memoryview) and (data.format != "B" or data.ndim != 1):
            data = data.cast("B")
        length = len(data)
        table = self._table
        i = bisect.bisect_right(table.starts, addr) - 1
        if i >= 0 and length > 0:
            region = table.regions[i]
            offset = addr - region.iova
            if offset + length <= region.size and region.buffer is not None and region.writable:
                region.buffer[offset : offset + length] = data
                return
        if length == 0:
            return
        pieces = self._pieces(addr, length)
        for piece_addr, n, region in pieces:  # all or nothing as far as we can tell
            if not region.writable:
                raise DmaError(_denied(piece_addr, n, True))
        pos = 0
        for piece_addr, n, region in pieces:
            chunk = data[pos : pos + n]
            if region.buffer is not None:
                offset = piece_addr - region.iova
                region.buffer[offset : offset + n] = chunk
            else:
                self._transport_for(piece_addr).dma_write(piece_addr, chunk)
            pos += n

    def _pieces(self, addr: int, length: int) -> list[tuple[int, int, DmaRegion]]:
        """[addr, addr+length) split at region boundaries; DmaError for a gap."""
        if length < 0 or addr < 0:
            raise DmaError(f"DMA range {addr:#x}+{length:#x} is invalid")
        table = self._table
        pieces = []
        i = bisect.bisect_right(table.starts, addr) - 1
        while length > 0:
            if (
                i < 0
                or i >= len(table.regions)
                or not table.regions[i].iova <= addr < table.regions[i].end
            ):
                raise DmaError(f"DMA to {addr:#x}+{length:#x}: not mapped")
            region = table.regions[i]
            n = min(length, region.end - addr)
            pieces.append((addr, n, region))
            addr += n
            length -= n
            i += 1
        return pieces

    def _transport_for(self, addr: int) -> MessageDma:
        transport = self._transport
        if transport is None:
            raise DmaError(f"DMA to {addr:#x}: needs messages and no client is connected")
        return transport


def _mapped(region: DmaRegion) -> MappedRegion:
    return (region.iova, region.size, region.buffer, region.readable, region.writable)


def _overlapping(table: _Table, iova: int, size: int) -> bool:
    i = bisect.bisect_right(table.starts, iova) - 1
    if i >= 0 and table.regions[i].end > iova:
        return True
    return i + 1 < len(table.regions) and table.regions[i + 1].iova < iova + size


def _denied(addr: int, length: int, writable: bool) -> str:
    return f"DMA {'write to' if writable else 'read from'} {addr:#x}+{length:#x}: not permitted"


def _mmap(
    fd: int, offset: int, size: int, readable: bool, writable: bool
) -> tuple[mmap.mmap, memoryview]:
    """Map [offset, offset+size) of fd. mmap wants a page-aligned file offset: map
    from the page below and slice the difference off."""
    start = offset - offset % _PAGE
    delta = offset - start
    try:
        if writable:
            prot = mmap.PROT_WRITE | (mmap.PROT_READ if readable else 0)
            mapping = mmap.mmap(fd, delta + size, mmap.MAP_SHARED, prot, offset=start)
        else:
            mapping = mmap.mmap(fd, delta + size, access=mmap.ACCESS_READ, offset=start)
    except OSError as exc:
        # e.g. EACCES for PROT_WRITE on an fd opened read-only, ENODEV for a pipe
        raise ProtocolError(exc.errno or errno.EINVAL, f"DMA_MAP mmap: {exc}") from None
    except (ValueError, OverflowError) as exc:
        # CPython refuses a range beyond the end of a regular file (it would SIGBUS)
        raise ProtocolError(errno.EINVAL, f"DMA_MAP mmap: {exc}") from None
    buffer = memoryview(mapping)[delta : delta + size]
    if not writable:
        buffer = buffer.toreadonly()
    return mapping, buffer


class _Watcher:
    """Reads the SIGBUS handler's eventfd and tells each memory that has faulted since
    it was last told (one client after another may truncate what they mapped). One
    thread for the process, started with the first memory."""

    def __init__(self) -> None:
        #: each memory watched, and how many of its faults it has been told of
        self._memories: weakref.WeakKeyDictionary[DmaMemory, int] = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def watch(self, memory: DmaMemory) -> None:
        with self._lock:
            self._memories[memory] = 0
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run,
                    args=(_native.sigbus_notifier(),),
                    name="sigbus-watch",
                    daemon=True,
                )
                self._thread.start()

    def _run(self, notifier: int) -> None:
        poller = select.poll()
        poller.register(notifier, select.POLLIN)
        while True:
            poller.poll()
            with contextlib.suppress(BlockingIOError):
                os.eventfd_read(notifier)
            with self._lock:
                lost = [m for m, told in self._memories.items() if m.faults > told]
                for memory in lost:
                    self._memories[memory] = memory.faults
            for memory in lost:
                log.error("a client truncated guest memory it had mapped for DMA")
                if memory._lost is not None:
                    try:
                        memory._lost()
                    except Exception:
                        log.exception("handling lost guest memory failed")


_watcher = _Watcher()
