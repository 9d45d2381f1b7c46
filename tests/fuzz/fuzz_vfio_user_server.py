#!/usr/bin/env python3
"""Fuzz target `vfio_user_server`: the vfio-user server's message dispatch (decode,
VERSION rule, handlers, error replies, fd ownership) against the unit tests' fake
device (tests/unit/vfio_user/vfio_user_fakes.py), one session per input.

Input: a flags byte (bit 0: start with QEMU's VERSION already negotiated), then
messages: [u16 msg_id, u16 command, u32 flags, u32 error, fd byte, u16 payload
length, payload]. The fd byte: how many fds come with the message (bits 0-1), eventfds
(bit 2, what SET_IRQS takes) or memfds (what DMA_MAP maps), and whether the kernel
truncated them (bit 7). Each message
goes to the server's dispatch as framing would hand it over; replies are read back
from the other end of a socket pair.

Invariants: a command without NO_REPLY gets exactly one reply, with its msg_id and
command, the reply type, and either no error or the ERROR flag, an errno and no
payload; a posted command (NO_REPLY) gets none; no handler fails with anything but
ProtocolError or DeviceError (the server logs any other exception as a device bug);
no fd leaks (each one passed is closed or owned by the device, which the
disconnect at the end releases).
"""

from __future__ import annotations

import atexit
import errno
import logging
import os
import shutil
import socket
import sys
import tempfile

import fuzzing

with fuzzing.instrumented(__name__):
    from nvme_mdev.vfio_user import protocol as p
    from nvme_mdev.vfio_user.framing import Message, MessageReader
    from nvme_mdev.vfio_user.server import Session, VfioUserServer
from vfio_user_fakes import FakeDevice

#: QEMU 11.1's VERSION payload (tests/unit/vfio_user/test_vfio_user_protocol.py)
QEMU_VERSION = (
    b"\x00\x00\x00\x00"
    b'{"capabilities": {"pgsizes": 4096, "max_msg_fds": 16, "max_dma_maps": 65535, '
    b'"max_data_xfer_size": 1048576, "migration": {"max_bitmap_size": 268435456, '
    b'"pgsize": 4096}, "write_multiple": true}}\x00'
)
#: the memfds passed as a message's fds: as big as a DMA_MAP of them may be
FD_SIZE = 1 << 16
MAX_MESSAGES = 32


class _Failures(logging.Handler):
    """Records what the server logs at ERROR: an exception a handler let through."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


_FAILURES = _Failures()

_DIR = tempfile.mkdtemp(prefix="fuzz-vu-", dir="/tmp")
DEVICE = FakeDevice()
#: never started: each input's messages go straight to its dispatch
SERVER = VfioUserServer(os.path.join(_DIR, "s"), DEVICE)


@atexit.register
def _cleanup() -> None:
    SERVER.stop()
    DEVICE.close()
    shutil.rmtree(_DIR, ignore_errors=True)


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _memfd() -> int:
    fd = os.memfd_create("fuzz-dma", os.MFD_CLOEXEC)
    os.ftruncate(fd, FD_SIZE)
    return fd


def _eventfd() -> int:
    return os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)


def _replies(peer: socket.socket) -> list[Message]:
    reader = MessageReader(peer)
    out: list[Message] = []
    while True:
        try:
            out.append(reader.receive())
        except BlockingIOError:
            break
    reader.close()
    return out


def _dispatch(session: Session, peer: socket.socket, message: Message) -> list[Message]:
    header = message.header
    SERVER._dispatch(session, message)
    assert not message.fds, "fds left in a handled message"
    if _FAILURES.records:
        record = _FAILURES.records[0]
        raise AssertionError(f"handler failed: {record.getMessage()}: {record.exc_info!r}")
    replies = _replies(peer)
    if header.no_reply:
        assert not replies, replies
        return replies
    assert len(replies) == 1, replies
    reply = replies[0]
    got = reply.header
    assert got.msg_id == header.msg_id and got.command == header.command, got
    assert got.is_reply and not got.no_reply, got
    if got.is_error:
        assert got.error != 0 and got.error in errno.errorcode, got
        assert not reply.payload and not reply.fds, reply
    else:
        assert got.error == 0, got
        if reply.fds:
            assert header.command == p.Command.DEVICE_GET_REGION_INFO, got
    return replies


def fuzz(data: bytes) -> None:
    with fuzzing.logs_to("nvme_mdev.vfio_user", logging.ERROR, _FAILURES):
        _fuzz(data)


def _fuzz(data: bytes) -> None:
    source = fuzzing.Input(data)
    flags = source.u8()
    before = _open_fds()
    ours, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    peer.setblocking(False)
    session = Session(ours)
    DEVICE.writes.clear()
    DEVICE.irq_requests.clear()
    _FAILURES.records.clear()
    try:
        if flags & 1:
            header = p.Header(0xFFFF, p.Command.VERSION, p.HEADER_SIZE + len(QEMU_VERSION), 0)
            (reply,) = _dispatch(session, peer, Message(header, QEMU_VERSION))
            assert not reply.header.is_error and session.negotiated
        for _ in range(MAX_MESSAGES):
            if not source.remaining():
                break
            msg_id, command, msg_flags, error = (
                source.u16(),
                source.u16(),
                source.u32(),
                source.u32(),
            )
            fd_byte, length = source.u8(), source.u16()
            payload = source.take(length)
            header = p.Header(msg_id, command, p.HEADER_SIZE + len(payload), msg_flags, error)
            make_fd = _eventfd if fd_byte & 0x4 else _memfd
            fds = [make_fd() for _ in range(fd_byte & 0x3)]
            message = Message(header, payload, fds, fds_truncated=bool(fd_byte & 0x80))
            for reply in _dispatch(session, peer, message):
                reply.close_fds()
    finally:
        SERVER._disconnect(session)  # resets the device, drops the DMA maps, closes `ours`
        peer.close()
    assert not DEVICE.fds, "IRQ fds kept past the reset"
    assert not SERVER.memory.regions, "DMA maps kept past the disconnect"
    after = _open_fds()
    assert after == before, f"{after - before} fds leaked"


if __name__ == "__main__":
    fuzzing.main(fuzz)
    sys.exit(0)
