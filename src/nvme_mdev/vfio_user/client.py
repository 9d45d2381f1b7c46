"""A vfio-user client: plays the part QEMU plays, so that tests, benchmarks and
scripts can drive a device as a guest would.

Guest RAM is a memfd mapped here and shared with the server through DMA_MAP
(`GuestRam`, `dma_map`). `add_message_region` instead registers memory the
server can reach only through DMA_READ/DMA_WRITE messages, which the client's
reader thread answers (as QEMU does, for guests without shared memory).

Thread-safe: any thread may send requests; a reader thread routes replies by
message id and serves the server's DMA requests.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import socket
import struct
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple, TypeVar

from ..guest_memory import words32
from . import protocol as p
from .framing import Message, MessageReader, close_fds, send_message

_T = TypeVar("_T")


class ClientError(Exception):
    """The server answered with an error (or the connection failed)."""

    def __init__(self, err: int, message: str) -> None:
        super().__init__(f"{message}: {os.strerror(err) if err else 'error'}")
        self.errno = err


class Reply(NamedTuple):
    header: p.Header
    payload: bytes
    #: passed with the reply; the caller owns them
    fds: list[int]


class DeviceInfo(NamedTuple):
    flags: int
    num_regions: int
    num_irqs: int


@dataclass(frozen=True)
class IrqInfo:
    flags: int
    count: int

    def __iter__(self) -> Iterator[int]:  # unpacks as (flags, count)
        return iter((self.flags, self.count))

    def __getitem__(self, i: int) -> int:
        return (self.flags, self.count)[i]


@dataclass(frozen=True)
class RegionInfo:
    index: int
    flags: int
    size: int
    sparse_areas: tuple[tuple[int, int], ...]
    #: the fd to mmap the region from (yours to close), if the server sent one
    fd: int | None
    #: where the region starts in fd
    offset: int = 0
    #: the reply size the server said it needs
    argsz: int = p.REGION_INFO.size


class GuestRam:
    """`size` bytes of guest RAM in a memfd, at guest-physical address `base`."""

    def __init__(self, size: int, base: int = 0, name: str = "nvme-mdev-guest-ram") -> None:
        self.size = size
        self.base = base
        self.fd = os.memfd_create(name, os.MFD_CLOEXEC)
        try:
            os.ftruncate(self.fd, size)
            self.map = mmap.mmap(self.fd, size, mmap.MAP_SHARED)
        except BaseException:
            os.close(self.fd)
            raise
        self.view = memoryview(self.map)
        #: the same memory as 32-bit words, for stores the device polls (see words32)
        self.words = words32(self.view)

    @property
    def end(self) -> int:
        return self.base + self.size

    def read(self, addr: int, length: int) -> bytes:
        off = self._offset(addr, length)
        return bytes(self.view[off : off + length])

    def write(self, addr: int, data: p.Bytes) -> None:
        off = self._offset(addr, len(data))
        self.view[off : off + len(data)] = data

    def _offset(self, addr: int, length: int) -> int:
        if not self.base <= addr <= addr + length <= self.end:
            raise ValueError(f"{addr:#x}+{length:#x} outside guest RAM")
        return addr - self.base

    def close(self) -> None:
        self.words.release()
        self.view.release()
        self.map.close()
        os.close(self.fd)


@dataclass
class _MessageRegion:
    base: int
    buffer: bytearray | memoryview
    readable: bool
    writable: bool

    @property
    def end(self) -> int:
        return self.base + len(self.buffer)


class _Waiter:
    """One reply awaited; a bare lock is the cheapest wake-up (an Event costs more)."""

    __slots__ = ("_lock", "reply")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._lock.acquire()
        self.reply: Message | None = None

    def set(self) -> None:  # once: whoever pops the waiter from the table
        self._lock.release()

    def wait(self, timeout: float) -> bool:
        return self._lock.acquire(timeout=timeout)


class VfioUserClient:
    def __init__(self, socket_path: str, timeout: float = 10.0) -> None:
        self.timeout = timeout
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.sock.connect(socket_path)
        except BaseException:
            self.sock.close()
            raise
        #: what the server offered in VERSION (defaults until negotiate())
        self.server_caps = p.Capabilities()
        #: DMA_READ / DMA_WRITE requests served so far
        self.dma_reads = 0
        self.dma_writes = 0
        self._reader = MessageReader(self.sock)
        self._send_lock = threading.Lock()
        self._lock = threading.Lock()
        self._next_id = 0
        self._waiters: dict[int, _Waiter] = {}
        self._regions: list[_MessageRegion] = []
        self._closed = False
        self._lost: str | None = None
        self._thread = threading.Thread(
            target=self._read_loop, name="vfio-user-client", daemon=True
        )
        self._thread.start()

    # --- plumbing ------------------------------------------------------------------

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self._thread.join(timeout=5)
        self._reader.close()
        self.sock.close()

    def __enter__(self) -> VfioUserClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def connected(self) -> bool:
        return self._lost is None and not self._closed

    def send_raw(self, data: bytes, fds: Sequence[int] = ()) -> None:
        """Bytes as they are (malformed-input tests)."""
        with self._send_lock:
            send_message(self.sock, data, fds)

    def request(
        self,
        command: int,
        payload: bytes = b"",
        fds: Sequence[int] = (),
        *,
        no_reply: bool = False,
        check: bool = True,
        raw: bytes | None = None,
    ) -> Reply:
        """Send a command and wait for its reply. `raw` replaces the whole message
        (its msg_id field is overwritten with ours). With check, an error reply
        raises ClientError; without, it is returned."""
        waiter = None if no_reply else _Waiter()
        with self._lock:
            if self._lost is not None:
                raise ClientError(errno.ECONNRESET, self._lost)
            msg_id = self._next_id
            while msg_id in self._waiters:
                msg_id = (msg_id + 1) & 0xFFFF
            self._next_id = (msg_id + 1) & 0xFFFF
            if waiter is not None:
                self._waiters[msg_id] = waiter
        if raw is None:
            message = p.encode_message(msg_id, command, payload, no_reply=no_reply)
        else:
            message = struct.pack("<H", msg_id) + raw[2:]
        try:
            self.send_raw(message, fds)
        except OSError:
            with self._lock:
                self._waiters.pop(msg_id, None)
            raise
        if waiter is None:
            return Reply(p.Header(msg_id, command, len(message), p.FLAG_NO_REPLY), b"", [])
        if not waiter.wait(self.timeout):
            with self._lock:
                self._waiters.pop(msg_id, None)
            raise TimeoutError(f"no reply to command {command} (id {msg_id}) in {self.timeout} s")
        reply = waiter.reply
        if reply is None:
            raise ClientError(errno.ECONNRESET, self._lost or "connection lost")
        result = Reply(reply.header, reply.payload, reply.fds)
        if check and reply.header.is_error:
            close_fds(reply.fds)
            raise ClientError(reply.header.error or errno.EIO, f"command {command} failed")
        return result

    def _read_loop(self) -> None:
        reason = "connection closed"
        while True:
            try:
                message = self._reader.receive()
            except (OSError, p.ProtocolError) as exc:
                reason = f"connection lost: {exc}"
                break
            if message.header.is_reply:
                with self._lock:
                    waiter = self._waiters.pop(message.header.msg_id, None)
                if waiter is None:
                    message.close_fds()
                    continue
                waiter.reply = message
                waiter.set()
            else:
                self._serve(message)
        with self._lock:
            self._lost = reason
            waiters = list(self._waiters.values())
            self._waiters.clear()
        for waiter in waiters:
            waiter.set()

    def _serve(self, message: Message) -> None:
        """Answer the server's DMA_READ/DMA_WRITE as QEMU 11.1 does: a DMA_READ reply
        is {address, count, data}, a DMA_WRITE reply a bare header."""
        header = message.header
        payload = b""
        error = 0
        try:
            if message.fds:
                raise p.ProtocolError(errno.EINVAL, "a request with fds")
            limit = self.server_caps.effective_max_data_xfer_size
            if header.command == p.Command.DMA_READ:
                access = p.DmaAccess.decode(message.payload, with_data=False, max_count=limit)
                data = self._message_access(access.address, access.count, None)
                payload = p.DmaAccess(access.address, access.count, data).encode()
                self.dma_reads += 1
            elif header.command == p.Command.DMA_WRITE:
                access = p.DmaAccess.decode(message.payload, with_data=True, max_count=limit)
                self._message_access(access.address, access.count, access.data)
                self.dma_writes += 1
            else:
                raise p.ProtocolError(errno.ENOSYS, f"command {header.command}")
        except p.ProtocolError as exc:
            error = exc.errno
        except Exception:  # e.g. memory closed under us: answer, keep reading
            error = errno.EFAULT
        finally:
            message.close_fds()
        if not header.no_reply:
            with contextlib.suppress(OSError):
                self.send_raw(
                    p.encode_message(
                        header.msg_id, header.command, payload, reply=True, error=error
                    )
                )

    def _message_access(self, addr: int, count: int, data: bytes | None) -> bytes:
        with self._lock:
            regions = list(self._regions)
        for region in regions:
            if region.base <= addr and addr + count <= region.end:
                if not (region.writable if data is not None else region.readable):
                    raise p.ProtocolError(errno.EPERM, f"{addr:#x}: access denied")
                off = addr - region.base
                if data is None:
                    return bytes(region.buffer[off : off + count])
                region.buffer[off : off + count] = data
                return b""
        raise p.ProtocolError(errno.EFAULT, f"{addr:#x}+{count:#x} is not mapped")

    # --- VERSION and information ---------------------------------------------------------

    def negotiate(
        self,
        max_msg_fds: int = p.MAX_MSG_FDS,
        max_data_xfer_size: int = p.MAX_DATA_XFER_SIZE,
        max_dma_maps: int = p.MAX_DMA_MAPS,
        write_multiple: bool = True,
    ) -> p.Capabilities:
        ours = p.Capabilities(
            max_msg_fds, max_data_xfer_size, p.PAGE_SIZE, max_dma_maps, write_multiple
        )
        reply = self.request(p.Command.VERSION, p.Version(p.MAJOR, p.MINOR, ours).encode())
        version = _decode(p.Version.decode, reply.payload)
        if version.major != p.MAJOR or version.minor > p.MINOR:
            raise ClientError(errno.EPROTO, f"server speaks {version.major}.{version.minor}")
        self.server_caps = version.capabilities or p.Capabilities()
        return self.server_caps

    def device_info(self) -> DeviceInfo:
        reply = self.request(p.Command.DEVICE_GET_INFO, p.DeviceInfo().encode())
        info = _decode(p.DeviceInfo.decode, reply.payload)
        return DeviceInfo(info.flags, info.num_regions, info.num_irqs)

    def region_info(self, index: int, argsz: int | None = None) -> RegionInfo:
        """The region's info and its mmap fd (yours to close), if any. Without argsz,
        asks as QEMU does: with the bare structure, then again with the argsz the
        reply says it needs. With argsz, asks once and returns what came."""
        size = argsz or p.REGION_INFO.size
        while True:
            reply = self.request(
                p.Command.DEVICE_GET_REGION_INFO, p.RegionInfoRequest(index, size).encode()
            )
            try:
                info = _decode(p.RegionInfo.decode, reply.payload)
                if len(reply.fds) > 1:
                    raise ClientError(errno.EPROTO, f"{len(reply.fds)} fds with region info")
            except BaseException:
                close_fds(reply.fds)
                raise
            fd = reply.fds[0] if reply.fds else None
            if info.argsz <= size or argsz is not None:
                return RegionInfo(
                    info.index,
                    info.flags,
                    info.size,
                    info.sparse_areas,
                    fd,
                    info.offset,
                    info.argsz,
                )
            close_fds(reply.fds)
            size = info.argsz

    def irq_info(self, index: int) -> IrqInfo:
        reply = self.request(p.Command.DEVICE_GET_IRQ_INFO, p.IrqInfo(index).encode())
        info = _decode(p.IrqInfo.decode, reply.payload)
        return IrqInfo(info.flags, info.count)

    # --- interrupts -------------------------------------------------------------------

    def set_irqs(
        self,
        index: int,
        flags: int,
        start: int = 0,
        count: int = 0,
        fds: Sequence[int] | None = None,
        data: bytes = b"",
        *,
        bools: Sequence[bool] | None = None,
    ) -> None:
        """SET_IRQS. `flags` holds the IRQ_SET_ACTION_* and may hold the IRQ_SET_DATA_*
        type; without one, it follows from the arguments: fds (eventfds, -1 detaches;
        sent in chunks of the server's max_msg_fds, each chunk all fds or all -1, as
        QEMU does), bools (or raw DATA_BOOL `data`), or neither (DATA_NONE)."""
        data_type = flags & p.IRQ_SET_DATA_TYPE_MASK
        action = flags & ~p.IRQ_SET_DATA_TYPE_MASK
        if bools is not None:
            data = bytes(1 if b else 0 for b in bools)
        if not data_type:
            if fds is not None:
                data_type = p.IRQ_SET_DATA_EVENTFD
            elif bools is not None or data:
                data_type = p.IRQ_SET_DATA_BOOL
            else:
                data_type = p.IRQ_SET_DATA_NONE
        if data_type == p.IRQ_SET_DATA_EVENTFD:
            fds = list(fds or [])
            if len(fds) != count:
                raise ValueError(f"{len(fds)} fds for {count} vectors")
            chunk_max = max(1, self.server_caps.effective_max_msg_fds)
            pos = 0
            while pos < count:
                valid = fds[pos] >= 0
                n = 1
                while n < chunk_max and pos + n < count and (fds[pos + n] >= 0) == valid:
                    n += 1
                payload = p.IrqSet(data_type | action, index, start + pos, n).encode()
                self.request(
                    p.Command.DEVICE_SET_IRQS, payload, fds[pos : pos + n] if valid else ()
                )
                pos += n
            return
        payload = p.IrqSet(data_type | action, index, start, count, data).encode()
        self.request(p.Command.DEVICE_SET_IRQS, payload)

    def enable_msix(self, count: int) -> list[int]:
        """Give the device `count` MSI-X eventfds; returns them (yours to read and
        close)."""
        fds = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(count)]
        try:
            self.set_irqs(2, p.IRQ_SET_ACTION_TRIGGER, 0, count, fds=fds)
        except BaseException:
            close_fds(fds)
            raise
        return fds

    def enable_intx(self) -> int:
        """An INTx eventfd (yours); the device automasks after each: unmask_intx()."""
        fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        try:
            self.set_irqs(0, p.IRQ_SET_ACTION_TRIGGER, 0, 1, fds=[fd])
        except BaseException:
            os.close(fd)
            raise
        return fd

    def unmask_intx(self) -> None:
        self.set_irqs(0, p.IRQ_SET_ACTION_UNMASK, 0, 1)

    def disable_irqs(self, index: int) -> None:
        """DATA_NONE|TRIGGER with count 0: every vector of the index off."""
        self.set_irqs(index, p.IRQ_SET_ACTION_TRIGGER, 0, 0)

    # --- region access ----------------------------------------------------------------

    def region_read(self, index: int, offset: int, count: int) -> bytes:
        reply = self.request(p.Command.REGION_READ, p.RegionAccess(index, offset, count).encode())
        access = _decode(p.RegionAccess.decode_read_reply, reply.payload, count)
        return access.data

    def region_write(self, index: int, offset: int, data: bytes, posted: bool = False) -> None:
        """With posted, NO_REPLY: no answer comes (a later request is ordered after it)."""
        payload = p.RegionAccess(index, offset, len(data), bytes(data)).encode()
        self.request(p.Command.REGION_WRITE, payload, no_reply=posted)

    def write_multi(self, writes: Iterable[tuple[int, int, bytes]], posted: bool = True) -> None:
        """REGION_WRITE_MULTI of (region, offset, data ≤ 8 bytes) writes; QEMU always
        posts these."""
        message = p.WriteMulti(tuple(p.RegionAccess(r, o, len(d), bytes(d)) for r, o, d in writes))
        self.request(p.Command.REGION_WRITE_MULTI, message.encode(), no_reply=posted)

    def read32(self, index: int, offset: int) -> int:
        return int.from_bytes(self.region_read(index, offset, 4), "little")

    def read64(self, index: int, offset: int) -> int:
        return int.from_bytes(self.region_read(index, offset, 8), "little")

    def write32(self, index: int, offset: int, value: int, posted: bool = False) -> None:
        self.region_write(index, offset, value.to_bytes(4, "little"), posted)

    def write64(self, index: int, offset: int, value: int, posted: bool = False) -> None:
        self.region_write(index, offset, value.to_bytes(8, "little"), posted)

    # --- guest memory -----------------------------------------------------------------

    def dma_map(self, ram: GuestRam, readable: bool = True, writable: bool = True) -> None:
        """Share `ram` with the server (it mmaps the memfd)."""
        self.dma_map_fd(ram.base, ram.size, ram.fd, 0, readable, writable)
        self._add_region(_MessageRegion(ram.base, ram.view, readable, writable))

    def dma_map_fd(
        self,
        iova: int,
        size: int,
        fd: int,
        offset: int = 0,
        readable: bool = True,
        writable: bool = True,
    ) -> None:
        """DMA_MAP [iova, iova+size) backed by fd at offset (the fd stays yours)."""
        flags = (p.DMA_MAP_FLAG_READ if readable else 0) | (p.DMA_MAP_FLAG_WRITE if writable else 0)
        self.request(p.Command.DMA_MAP, p.DmaMap(flags, offset, iova, size).encode(), [fd])

    def add_message_region(
        self, base: int, size: int, readable: bool = True, writable: bool = True
    ) -> bytearray:
        """Guest memory the server reaches only through DMA_READ/DMA_WRITE, served
        from the returned buffer."""
        buffer = bytearray(size)
        flags = (p.DMA_MAP_FLAG_READ if readable else 0) | (p.DMA_MAP_FLAG_WRITE if writable else 0)
        self._add_region(_MessageRegion(base, buffer, readable, writable))
        try:
            self.request(p.Command.DMA_MAP, p.DmaMap(flags, 0, base, size).encode())
        except BaseException:
            self._drop_regions(base, size)
            raise
        return buffer

    def dma_unmap(self, iova: int, size: int) -> None:
        self.request(p.Command.DMA_UNMAP, p.DmaUnmap(0, iova, size).encode())
        self._drop_regions(iova, size)

    def dma_unmap_all(self) -> None:
        self.request(p.Command.DMA_UNMAP, p.DmaUnmap(p.DMA_UNMAP_FLAG_ALL, 0, 0).encode())
        with self._lock:
            self._regions = []

    def reset(self) -> None:
        self.request(p.Command.DEVICE_RESET)

    def _add_region(self, region: _MessageRegion) -> None:
        with self._lock:
            self._regions = [*self._regions, region]

    def _drop_regions(self, iova: int, size: int) -> None:
        with self._lock:
            self._regions = [
                r for r in self._regions if not (r.base == iova and len(r.buffer) == size)
            ]


def _decode(decoder: Callable[..., _T], *args: object) -> _T:
    try:
        return decoder(*args)
    except p.ProtocolError as exc:
        raise ClientError(errno.EPROTO, f"malformed reply: {exc}") from None
