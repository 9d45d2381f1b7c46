"""The vfio-user server: one UNIX socket, one client at a time, messages handled
strictly in order on the connection's thread.

The device sees only the Device interface; guest memory lives in DmaMemory. The
connection thread never waits for the client (QEMU may be blocked waiting for
our reply), so DMA_READ/DMA_WRITE requests are only sent from the device's own
threads, and their replies are routed to them by message id.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import select
import socket
import stat
import threading
from collections.abc import Callable

from . import protocol as p
from .device import Device, DeviceError, IrqAction, IrqSet
from .framing import receive_message, send_message
from .memory import DmaMemory

log = logging.getLogger(__name__)

#: a reply payload, or a payload and the fds to pass with it
Reply = bytes | tuple[bytes, list[int]]

REPLY_TIMEOUT = 5.0  # what QEMU allows us; we allow it the same


class SocketInUse(Exception):
    """The socket path is taken (a live server, or not a socket at all)."""


class Disconnected(Exception):
    pass


def _prepare_socket_path(path: str) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise SocketInUse(f"{path}: exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError:
        os.unlink(path)  # stale: nobody listens
        return
    finally:
        probe.close()
    raise SocketInUse(f"{path}: in use by a running server")


class Connection:
    """One client. The reading thread dispatches its commands; any thread may send
    a request of its own (DMA_READ/DMA_WRITE) and wait for the reply."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.caps = p.ClientCapabilities()
        self._send_lock = threading.Lock()
        self._waiters: dict[int, tuple[threading.Event, list[tuple[p.Header, bytes]]]] = {}
        self._waiters_lock = threading.Lock()
        self._next_id = 0
        self.closed = False

    # --- sending -------------------------------------------------------------------

    def send(self, data: bytes, fds: list[int] | None = None) -> None:
        with self._send_lock:
            send_message(self.sock, data, fds)

    def request(self, command: int, payload: bytes) -> tuple[p.Header, bytes]:
        """Send a request to the client and wait for its reply (device threads only)."""
        event = threading.Event()
        box: list[tuple[p.Header, bytes]] = []
        with self._waiters_lock:
            if self.closed:
                raise Disconnected("client gone")
            msg_id = self._next_id
            self._next_id = (self._next_id + 1) & 0xFFFF
            self._waiters[msg_id] = (event, box)
        try:
            self.send(p.encode(msg_id, command, payload))
            if not event.wait(REPLY_TIMEOUT):
                raise TimeoutError(f"no reply to command {command} in {REPLY_TIMEOUT} s")
        finally:
            with self._waiters_lock:
                self._waiters.pop(msg_id, None)
        if not box:
            raise Disconnected("client gone")
        header, reply = box[0]
        if header.flags & p.FLAG_ERROR:
            raise p.ProtocolError(header.error or errno.EIO, f"client error {header.error}")
        return header, reply

    def deliver_reply(self, header: p.Header, payload: bytes) -> None:
        with self._waiters_lock:
            waiter = self._waiters.get(header.msg_id)
        if waiter is None:
            log.warning("reply to unknown message %d dropped", header.msg_id)
            return
        waiter[1].append((header, payload))
        waiter[0].set()

    def fail_waiters(self) -> None:
        with self._waiters_lock:
            self.closed = True
            waiters = list(self._waiters.values())
        for event, _ in waiters:
            event.set()

    def dma_read(self, addr: int, length: int) -> bytes:
        out = []
        chunk = self.caps.max_data_xfer_size
        for pos in range(0, length, chunk):
            n = min(chunk, length - pos)
            _, reply = self.request(p.Command.DMA_READ, p.encode_dma_read(addr + pos, n))
            _, count, data = p.decode_dma_rw(reply)
            if count != n:
                raise p.ProtocolError(errno.EIO, f"DMA_READ returned {count} of {n} bytes")
            out.append(data)
        return b"".join(out)

    def dma_write(self, addr: int, data: bytes | bytearray | memoryview) -> None:
        chunk = self.caps.max_data_xfer_size
        for pos in range(0, len(data), chunk):
            piece = data[pos : pos + chunk]
            self.request(p.Command.DMA_WRITE, p.encode_dma_write(addr + pos, piece))

    # --- receiving -----------------------------------------------------------------

    def receive(self) -> tuple[p.Header, bytes, list[int]]:
        """The next whole message and the fds that came with it."""
        return receive_message(self.sock)


class VfioUserServer:
    def __init__(
        self,
        socket_path: str,
        device: Device,
        memory: DmaMemory,
        irq_info_flags: tuple[int, ...] | None = None,
    ) -> None:
        self.socket_path = socket_path
        self.device = device
        self.memory = memory
        self.irq_info_flags = irq_info_flags or tuple(
            getattr(device, "irq_info_flags", (1,) * len(device.irq_counts))
        )
        _prepare_socket_path(socket_path)
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)  # whoever connects can read and write the namespaces
        try:
            self._listener.bind(socket_path)
        except OSError as exc:
            self._listener.close()
            raise SocketInUse(f"{socket_path}: {exc.strerror}") from exc
        finally:
            os.umask(old_umask)
        os.chmod(socket_path, 0o600)
        self._listener.listen(1)
        self._stop_r, self._stop_w = os.pipe()
        self._thread = threading.Thread(target=self.serve_forever, name="vfio-user", daemon=True)
        self.connection: Connection | None = None
        self._handlers: dict[int, Callable[[Connection, p.Header, bytes, list[int]], Reply]] = {
            p.Command.VERSION: self._version,
            p.Command.DMA_MAP: self._dma_map,
            p.Command.DMA_UNMAP: self._dma_unmap,
            p.Command.DEVICE_GET_INFO: self._device_info,
            p.Command.DEVICE_GET_REGION_INFO: self._region_info,
            p.Command.DEVICE_GET_IRQ_INFO: self._irq_info,
            p.Command.DEVICE_SET_IRQS: self._set_irqs,
            p.Command.REGION_READ: self._region_read,
            p.Command.REGION_WRITE: self._region_write,
            p.Command.REGION_WRITE_MULTI: self._region_write_multi,
            p.Command.DEVICE_RESET: self._device_reset,
        }

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        os.write(self._stop_w, b"x")
        conn = self.connection
        if conn is not None:
            with contextlib.suppress(OSError):
                conn.sock.shutdown(socket.SHUT_RDWR)
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join()
        self._listener.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket_path)
        os.close(self._stop_r)
        os.close(self._stop_w)

    def serve_forever(self) -> None:
        while True:
            ready, _, _ = select.select([self._listener.fileno(), self._stop_r], [], [])
            if self._stop_r in ready:
                return
            try:
                sock, _ = self._listener.accept()
            except OSError:
                continue
            log.info("client connected")
            conn = Connection(sock)
            self.connection = conn
            try:
                self._serve(conn)
            finally:
                self._disconnect(conn)
            if select.select([self._stop_r], [], [], 0)[0]:
                return

    def _serve(self, conn: Connection) -> None:
        while True:
            try:
                header, payload, fds = conn.receive()
            except (Disconnected, OSError) as exc:
                log.info("client disconnected: %s", exc)
                return
            except p.ProtocolError as exc:
                log.error("dropping client: unusable message framing: %s", exc)
                return
            if header.is_reply:
                for fd in fds:
                    os.close(fd)
                conn.deliver_reply(header, payload)
                continue
            self._dispatch(conn, header, payload, fds)

    def _dispatch(self, conn: Connection, header: p.Header, payload: bytes, fds: list[int]) -> None:
        handler = self._handlers.get(header.command)
        error = 0
        reply: Reply = b""
        try:
            if handler is None:
                raise p.ProtocolError(errno.ENOTSUP, f"command {header.command} not supported")
            reply = handler(conn, header, payload, fds)
            fds = []  # the handler owns them now
        except (p.ProtocolError, DeviceError) as exc:
            error = exc.errno or errno.EINVAL
            log.debug("command %d failed: %s", header.command, exc)
        except Exception as exc:  # a bug must not take the server down with it
            log.exception("command %d failed", header.command)
            error = exc.errno if isinstance(exc, OSError) and exc.errno else errno.EIO
        finally:
            for fd in fds:
                os.close(fd)
        if not header.wants_reply:
            return
        reply_fds: list[int] = []
        if isinstance(reply, tuple):
            reply, reply_fds = reply
        message = p.encode(header.msg_id, header.command, b"" if error else reply, True, error)
        try:
            conn.send(message, reply_fds if not error else None)
        except OSError as exc:
            log.info("reply not sent: %s", exc)

    def _disconnect(self, conn: Connection) -> None:
        conn.fail_waiters()
        self.memory.dma_read = self.memory.dma_write = None
        self.connection = None
        with contextlib.suppress(OSError):
            conn.sock.close()
        try:
            self.device.reset()
            with self.device.quiesced():
                removed = self.memory.clear()
            for region in removed:
                region.close()
        except Exception:
            log.exception("resetting the device after the client left")
        log.info("device reset; waiting for the next client")

    # --- command handlers ---------------------------------------------------------------
    # Each returns the reply payload, or raises ProtocolError / DeviceError.

    def _version(self, conn: Connection, h: p.Header, payload: bytes, fds: list[int]) -> bytes:
        major, minor, caps = p.decode_version(payload)
        if major != 0:
            raise p.ProtocolError(errno.ENOTSUP, f"vfio-user version {major}.{minor}")
        reply, conn.caps = p.encode_version_reply(caps)
        self.memory.max_regions = conn.caps.max_dma_maps
        self.memory.dma_read = conn.dma_read
        self.memory.dma_write = conn.dma_write
        return reply

    def _dma_map(self, conn: Connection, h: p.Header, payload: bytes, fds: list[int]) -> bytes:
        _, flags, offset, iova, size = p.unpack(p.DMA_MAP, payload, "DMA_MAP")
        if len(fds) > 1:
            raise p.ProtocolError(errno.EINVAL, f"DMA_MAP with {len(fds)} fds")
        fd = fds.pop() if fds else None
        readable = bool(flags & p.DMA_MAP_FLAG_READ)
        writable = bool(flags & p.DMA_MAP_FLAG_WRITE)
        self.memory.add(iova, size, readable, writable, fd, offset)
        log.debug("DMA_MAP %#x+%#x fd=%s", iova, size, fd)
        return b""

    def _dma_unmap(self, conn: Connection, h: p.Header, payload: bytes, fds: list[int]) -> bytes:
        _, flags, iova, size = p.unpack(p.DMA_UNMAP, payload, "DMA_UNMAP")
        if flags & p.DMA_UNMAP_FLAG_GET_DIRTY_BITMAP:
            raise p.ProtocolError(errno.ENOTSUP, "dirty page tracking is not supported")
        if flags & ~(p.DMA_UNMAP_FLAG_ALL | p.DMA_UNMAP_FLAG_GET_DIRTY_BITMAP):
            raise p.ProtocolError(errno.EINVAL, f"DMA_UNMAP flags {flags:#x}")
        with self.device.quiesced():
            removed = self.memory.remove(iova, size, bool(flags & p.DMA_UNMAP_FLAG_ALL))
            for region in removed:
                region.close()
        return p.DMA_UNMAP.pack(p.DMA_UNMAP.size, flags, iova, size)

    def _device_info(self, conn: Connection, h: p.Header, payload: bytes, fds: list[int]) -> bytes:
        p.unpack(p.DEVICE_INFO, payload[:4].ljust(16, b"\0"), "DEVICE_GET_INFO")
        flags = p.DEVICE_FLAGS_PCI | p.DEVICE_FLAGS_RESET
        return p.DEVICE_INFO.pack(
            p.DEVICE_INFO.size, flags, len(self.device.regions), len(self.device.irq_counts)
        )

    def _region_info(
        self, conn: Connection, h: p.Header, payload: bytes, fds: list[int]
    ) -> Reply:
        argsz, _, index, _, _, _ = p.unpack(p.REGION_INFO, payload, "GET_REGION_INFO")
        if argsz < p.REGION_INFO.size:
            raise p.ProtocolError(errno.EINVAL, f"GET_REGION_INFO argsz {argsz}")
        if index >= len(self.device.regions):
            raise p.ProtocolError(errno.EINVAL, f"no region {index}")
        region = self.device.regions[index]
        flags = 0
        if region.size:
            flags |= p.REGION_INFO_FLAG_READ if region.read else 0
            flags |= p.REGION_INFO_FLAG_WRITE if region.write else 0
        areas = [(a.offset, a.size) for a in region.mmap_areas]
        reply_fds: list[int] = []
        if region.mmap_fd is not None and areas:
            flags |= p.REGION_INFO_FLAG_MMAP
            reply_fds = [region.mmap_fd]
        reply = p.encode_region_info(argsz, index, flags, region.size, areas)
        return (reply, reply_fds)

    def _irq_info(self, conn: Connection, h: p.Header, payload: bytes, fds: list[int]) -> bytes:
        _, _, index, _ = p.unpack(p.IRQ_INFO, payload, "GET_IRQ_INFO")
        if index >= len(self.device.irq_counts):
            raise p.ProtocolError(errno.EINVAL, f"no IRQ index {index}")
        return p.IRQ_INFO.pack(
            p.IRQ_INFO.size, self.irq_info_flags[index], index, self.device.irq_counts[index]
        )

    def _set_irqs(self, conn: Connection, h: p.Header, payload: bytes, fds: list[int]) -> bytes:
        _, flags, index, start, count = p.unpack(p.IRQ_SET, payload, "SET_IRQS")
        data_type = flags & p.IRQ_SET_DATA_MASK
        action_bits = flags & p.IRQ_SET_ACTION_MASK_BITS
        actions = {
            p.IRQ_SET_ACTION_MASK: IrqAction.MASK,
            p.IRQ_SET_ACTION_UNMASK: IrqAction.UNMASK,
            p.IRQ_SET_ACTION_TRIGGER: IrqAction.TRIGGER,
        }
        if action_bits not in actions or data_type not in (
            p.IRQ_SET_DATA_NONE,
            p.IRQ_SET_DATA_BOOL,
            p.IRQ_SET_DATA_EVENTFD,
        ):
            raise p.ProtocolError(errno.EINVAL, f"SET_IRQS flags {flags:#x}")
        if index >= len(self.device.irq_counts):
            raise p.ProtocolError(errno.EINVAL, f"no IRQ index {index}")
        if count and start + count > self.device.irq_counts[index]:
            raise p.ProtocolError(errno.EINVAL, f"SET_IRQS {start}+{count} out of range")
        if not count and (flags != p.IRQ_SET_DATA_NONE | p.IRQ_SET_ACTION_TRIGGER or start):
            raise p.ProtocolError(errno.EINVAL, "SET_IRQS with count 0 only disables")
        request_fds: list[int] | None = None
        bools: list[bool] | None = None
        if data_type == p.IRQ_SET_DATA_EVENTFD:
            if fds and len(fds) != count:
                raise p.ProtocolError(errno.EINVAL, f"SET_IRQS: {len(fds)} fds for {count}")
            request_fds = list(fds) if fds else [-1] * count
        elif data_type == p.IRQ_SET_DATA_BOOL:
            raw = payload[p.IRQ_SET.size : p.IRQ_SET.size + count]
            if len(raw) != count:
                raise p.ProtocolError(errno.EINVAL, "SET_IRQS: missing bool data")
            bools = [bool(b) for b in raw]
        if fds and data_type != p.IRQ_SET_DATA_EVENTFD:
            raise p.ProtocolError(errno.EINVAL, "SET_IRQS: fds without DATA_EVENTFD")
        request = IrqSet(index, actions[action_bits], start, count, request_fds, bools)
        try:
            self.device.set_irqs(request)
        except BaseException:
            for fd in fds:
                os.close(fd)
            fds.clear()
            raise
        fds.clear()  # the device owns them
        return b""

    def _region_read(self, conn: Connection, h: p.Header, payload: bytes, fds: list[int]) -> bytes:
        offset, region, count, _ = p.decode_region_rw(payload, with_data=False)
        data = self.device.region_read(region, offset, count)
        return p.REGION_RW.pack(offset, region, len(data)) + data

    def _region_write(
        self, conn: Connection, h: p.Header, payload: bytes, fds: list[int]
    ) -> bytes:
        offset, region, count, data = p.decode_region_rw(payload, with_data=True)
        self.device.region_write(region, offset, data)
        return p.REGION_RW.pack(offset, region, count)

    def _region_write_multi(
        self, conn: Connection, h: p.Header, payload: bytes, fds: list[int]
    ) -> bytes:
        for region, offset, data in p.decode_write_multi(payload):
            self.device.region_write(region, offset, data)
        return b""

    def _device_reset(self, conn: Connection, h: p.Header, payload: bytes, fds: list[int]) -> bytes:
        self.device.reset()
        return b""
