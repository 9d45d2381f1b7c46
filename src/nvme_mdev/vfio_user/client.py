"""A vfio-user client: plays the part QEMU plays, so that tests, benchmarks and
scripts can drive a device directly.

Guest RAM is a memfd mapped here and shared with the server through DMA_MAP;
`add_message_region` instead registers memory the server must reach through
DMA_READ/DMA_WRITE messages, which a background thread answers.
"""

from __future__ import annotations

import contextlib
import errno
import json
import mmap
import os
import socket
import struct
import threading
from dataclasses import dataclass

from . import protocol as p
from .framing import receive_message, send_message


class ClientError(Exception):
    def __init__(self, err: int, message: str) -> None:
        super().__init__(f"{message}: {os.strerror(err)}")
        self.errno = err


@dataclass(frozen=True)
class RegionInfo:
    index: int
    flags: int
    size: int
    sparse_areas: tuple[tuple[int, int], ...]
    fd: int | None


class GuestRam:
    """A memfd of guest RAM at guest-physical address `base`."""

    def __init__(self, size: int, base: int = 0) -> None:
        self.size = size
        self.base = base
        self.fd = os.memfd_create("nvme-mdev-guest-ram", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, size)
        self.map = mmap.mmap(self.fd, size, mmap.MAP_SHARED)
        self.view = memoryview(self.map)

    def read(self, addr: int, length: int) -> bytes:
        off = addr - self.base
        return bytes(self.view[off : off + length])

    def write(self, addr: int, data: bytes | bytearray | memoryview) -> None:
        off = addr - self.base
        self.view[off : off + len(data)] = data

    def close(self) -> None:
        self.view.release()
        self.map.close()
        os.close(self.fd)


class VfioUserClient:
    def __init__(self, socket_path: str, timeout: float = 10.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(socket_path)
        self.timeout = timeout
        self._next_id = 0
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._replies: dict[
            int, tuple[threading.Event, list[tuple[p.Header, bytes, list[int]]]]
        ] = {}
        self._message_regions: list[tuple[int, bytearray]] = []
        self._closed = False
        self._reader = threading.Thread(
            target=self._read_loop, name="vfio-user-client", daemon=True
        )
        self._reader.start()
        self.server_caps: dict[str, object] = {}

    # --- plumbing -----------------------------------------------------------------------

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self._reader.join(timeout=5)
        self.sock.close()

    def __enter__(self) -> VfioUserClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send_raw(self, data: bytes, fds: list[int] | None = None) -> None:
        with self._send_lock:
            send_message(self.sock, data, fds)

    def request(
        self,
        command: int,
        payload: bytes = b"",
        fds: list[int] | None = None,
        no_reply: bool = False,
        raw: bytes | None = None,
    ) -> tuple[p.Header, bytes, list[int]]:
        """Send a command; return the reply's header, payload and fds. Raises ClientError
        on an error reply. `raw` replaces the whole message (for malformed-input tests;
        its msg_id is overwritten)."""
        with self._lock:
            msg_id = self._next_id
            self._next_id = (self._next_id + 1) & 0xFFFF
            event = threading.Event()
            box: list[tuple[p.Header, bytes, list[int]]] = []
            if not no_reply:
                self._replies[msg_id] = (event, box)
        message = raw if raw is not None else p.encode(msg_id, command, payload, no_reply=no_reply)
        message = struct.pack("<H", msg_id) + message[2:]
        self.send_raw(message, fds)
        if no_reply:
            return p.Header(msg_id, command, 0, 0, 0), b"", []
        if not event.wait(self.timeout):
            with self._lock:
                self._replies.pop(msg_id, None)
            raise TimeoutError(f"no reply to command {command}")
        header, reply, reply_fds = box[0]
        if header.flags & p.FLAG_ERROR:
            raise ClientError(header.error or errno.EIO, f"command {command} failed")
        return header, reply, reply_fds

    def _read_loop(self) -> None:
        while not self._closed:
            try:
                header, payload, fds = self._receive()
            except (OSError, ConnectionError, p.ProtocolError):
                break
            if header.is_reply:
                with self._lock:
                    waiter = self._replies.pop(header.msg_id, None)
                if waiter is None:
                    for fd in fds:
                        os.close(fd)
                    continue
                waiter[1].append((header, payload, fds))
                waiter[0].set()
            else:
                self._serve_request(header, payload)
        with self._lock:
            waiters = list(self._replies.values())
            self._replies.clear()
        for event, _ in waiters:
            event.set()

    def _receive(self) -> tuple[p.Header, bytes, list[int]]:
        return receive_message(self.sock)

    def _serve_request(self, header: p.Header, payload: bytes) -> None:
        """Answer DMA_READ/DMA_WRITE for regions registered without an fd."""
        try:
            addr, count = p.DMA_RW.unpack_from(payload)
            if header.command == p.Command.DMA_READ:
                data = self._message_access(addr, count, None)
                reply = p.encode_dma_write(addr, data)  # same layout: offset, count, data
            elif header.command == p.Command.DMA_WRITE:
                _, _, data = p.decode_dma_rw(payload)
                self._message_access(addr, count, data)
                reply = b""
            else:
                raise ClientError(errno.ENOSYS, f"command {header.command}")
            message = p.encode(header.msg_id, header.command, reply, reply=True)
        except (ClientError, struct.error, p.ProtocolError) as exc:
            err = exc.errno if isinstance(exc, ClientError | p.ProtocolError) else errno.EINVAL
            message = p.encode(header.msg_id, header.command, b"", reply=True, error=err)
        if header.wants_reply:
            self.send_raw(message)

    def _message_access(self, addr: int, count: int, data: bytes | None) -> bytes:
        for base, buf in self._message_regions:
            if base <= addr and addr + count <= base + len(buf):
                off = addr - base
                if data is None:
                    return bytes(buf[off : off + count])
                buf[off : off + count] = data
                return b""
        raise ClientError(errno.EFAULT, f"{addr:#x}+{count:#x} not in a message region")

    # --- commands -----------------------------------------------------------------------

    def negotiate(self, max_msg_fds: int = 16, max_data_xfer_size: int = p.MAX_DATA_XFER) -> None:
        caps = {
            "capabilities": {
                "max_msg_fds": max_msg_fds,
                "max_data_xfer_size": max_data_xfer_size,
                "pgsizes": 4096,
                "max_dma_maps": 65535,
                "write_multiple": True,
            }
        }
        payload = p.VERSION.pack(0, 0) + json.dumps(caps).encode() + b"\0"
        _, reply, _ = self.request(p.Command.VERSION, payload)
        major, _minor = p.VERSION.unpack_from(reply)
        if major != 0 or not reply.endswith(b"\0"):
            raise ClientError(errno.EPROTO, "bad VERSION reply")
        self.server_caps = json.loads(reply[p.VERSION.size : -1])["capabilities"]

    def device_info(self) -> tuple[int, int, int]:
        _, reply, _ = self.request(p.Command.DEVICE_GET_INFO, p.DEVICE_INFO.pack(16, 0, 0, 0))
        _, flags, regions, irqs = p.DEVICE_INFO.unpack_from(reply)
        return flags, regions, irqs

    def region_info(self, index: int, argsz: int = 256) -> RegionInfo:
        _, reply, fds = self.request(
            p.Command.DEVICE_GET_REGION_INFO, p.REGION_INFO.pack(argsz, 0, index, 0, 0, 0)
        )
        _needed, flags, index, cap_offset, size, _ = p.REGION_INFO.unpack_from(reply)
        areas: list[tuple[int, int]] = []
        if flags & p.REGION_INFO_FLAG_CAPS and cap_offset:
            _, _, _, count, _ = p.SPARSE_MMAP_HEADER.unpack_from(reply, cap_offset)
            start = cap_offset + p.SPARSE_MMAP_HEADER.size
            areas = [
                p.SPARSE_MMAP_AREA.unpack_from(reply, start + i * p.SPARSE_MMAP_AREA.size)
                for i in range(count)
            ]
        return RegionInfo(index, flags, size, tuple(areas), fds[0] if fds else None)

    def irq_info(self, index: int) -> tuple[int, int]:
        _, reply, _ = self.request(p.Command.DEVICE_GET_IRQ_INFO, p.IRQ_INFO.pack(16, 0, index, 0))
        _, flags, _, count = p.IRQ_INFO.unpack_from(reply)
        return flags, count

    def set_irqs(
        self,
        index: int,
        flags: int,
        start: int,
        count: int,
        fds: list[int] | None = None,
        data: bytes = b"",
    ) -> None:
        payload = p.IRQ_SET.pack(p.IRQ_SET.size + len(data), flags, index, start, count) + data
        self.request(p.Command.DEVICE_SET_IRQS, payload, fds=fds)

    def enable_msix(self, count: int) -> list[int]:
        """Give the device `count` MSI-X eventfds; returns them (read them to see interrupts)."""
        fds = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(count)]
        flags = p.IRQ_SET_DATA_EVENTFD | p.IRQ_SET_ACTION_TRIGGER
        chunk = int(str(self.server_caps.get("max_msg_fds", 1)))
        for start in range(0, count, chunk):
            self.set_irqs(2, flags, start, min(chunk, count - start), fds[start : start + chunk])
        return fds

    def region_read(self, index: int, offset: int, count: int) -> bytes:
        _, reply, _ = self.request(p.Command.REGION_READ, p.REGION_RW.pack(offset, index, count))
        _, _, got = p.REGION_RW.unpack_from(reply)
        return reply[p.REGION_RW.size : p.REGION_RW.size + got]

    def region_write(self, index: int, offset: int, data: bytes, posted: bool = False) -> None:
        payload = p.REGION_RW.pack(offset, index, len(data)) + data
        self.request(p.Command.REGION_WRITE, payload, no_reply=posted)

    def read32(self, index: int, offset: int) -> int:
        return int.from_bytes(self.region_read(index, offset, 4), "little")

    def write32(self, index: int, offset: int, value: int, posted: bool = False) -> None:
        self.region_write(index, offset, value.to_bytes(4, "little"), posted)

    def write64(self, index: int, offset: int, value: int) -> None:
        self.region_write(index, offset, value.to_bytes(8, "little"))

    def dma_map(self, ram: GuestRam, readable: bool = True, writable: bool = True) -> None:
        flags = (p.DMA_MAP_FLAG_READ if readable else 0) | (p.DMA_MAP_FLAG_WRITE if writable else 0)
        payload = p.DMA_MAP.pack(p.DMA_MAP.size, flags, 0, ram.base, ram.size)
        self.request(p.Command.DMA_MAP, payload, fds=[ram.fd])

    def add_message_region(self, base: int, size: int) -> bytearray:
        """Guest memory the server can reach only through DMA_READ/DMA_WRITE."""
        buf = bytearray(size)
        self._message_regions.append((base, buf))
        flags = p.DMA_MAP_FLAG_READ | p.DMA_MAP_FLAG_WRITE
        self.request(p.Command.DMA_MAP, p.DMA_MAP.pack(p.DMA_MAP.size, flags, 0, base, size))
        return buf

    def dma_unmap(self, iova: int, size: int, flags: int = 0) -> None:
        self.request(p.Command.DMA_UNMAP, p.DMA_UNMAP.pack(p.DMA_UNMAP.size, flags, iova, size))

    def reset(self) -> None:
        self.request(p.Command.DEVICE_RESET)
