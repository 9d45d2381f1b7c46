"""Whole vfio-user messages off a UNIX stream socket, with the fds that came
along, and sending them. Both ends (server.py, client.py) frame messages this
one way.

Reading is buffered: one recvmsg() may bring several small messages (a burst of
posted doorbell writes), which saves a system call per message on the hot path.
The fds of SCM_RIGHTS then need attributing to the right message. Linux hands
out an skb's fds with the read that consumes its first byte and ends that read
right after the skb; a sender passes fds with the sendmsg() that starts the
message they belong to (QEMU and our client send one message per call). So the
fds of one read belong to the last message that starts within the bytes that
read returned.
"""

from __future__ import annotations

import array
import contextlib
import os
import select
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field

from . import protocol as p

_INT_SIZE = array.array("i").itemsize
#: room for the most fds the kernel passes in one message, so none are truncated
_ANCILLARY_SPACE = socket.CMSG_SPACE(p.SCM_MAX_FD * _INT_SIZE)
_RECV_FLAGS = getattr(socket, "MSG_CMSG_CLOEXEC", 0)
_BUFFER_SIZE = 64 * 1024


@dataclass(slots=True)
class Message:
    header: p.Header
    payload: bytes
    #: received with the message; whoever handles it owns (and closes) them
    fds: list[int] = field(default_factory=list)
    #: the kernel dropped fds that did not fit (MSG_CTRUNC): the message is unusable
    fds_truncated: bool = False
    #: it may have been handled before, by a process that died before it answered
    #: (handled again, a request that finds its work done succeeds: see server.py)
    replayed: bool = False

    def close_fds(self) -> None:
        fds, self.fds = self.fds, []
        close_fds(fds)


def wait_readable(fd: int, timeout: float) -> bool:
    """Whether `fd` becomes readable within `timeout` seconds. poll(2), not select(2):
    a daemon serving many VMs holds fds numbered past select's limit of 1024."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(max(0, round(timeout * 1000))))


def close_fds(fds: Sequence[int]) -> None:
    for fd in fds:
        if fd >= 0:
            with contextlib.suppress(OSError):
                os.close(fd)


class MessageReader:
    """Reads whole messages from one socket; not thread-safe (one reader thread)."""

    def __init__(
        self, sock: socket.socket, max_size: int = p.MAX_MESSAGE_SIZE, exact: bool = False
    ) -> None:
        """`exact`: never read past the message being received, and take a message out
        of the socket only once it has been handled (consume()): a process that may
        die leaves the message it was handling, and those after it, whole in the
        socket for its successor."""
        self._sock = sock
        self._max_size = max_size
        self._exact = exact
        #: bytes of the last message that are still in the socket (exact: peeked)
        self._kept = 0
        self._buf = bytearray(_BUFFER_SIZE)
        self._view = memoryview(self._buf)
        self._start = 0  # first unread byte
        self._end = 0  # end of received data
        self._base = 0  # stream offset of _buf[0]
        #: fds waiting for their message, by the stream offset where it starts
        self._fds: dict[int, list[int]] = {}
        self._truncated: set[int] = set()

    def buffered(self) -> bool:
        """A whole message is already here (receive() will not block)."""
        avail = self._end - self._start
        if avail < p.HEADER_SIZE:
            return False
        size = int.from_bytes(self._buf[self._start + 4 : self._start + 8], "little")
        return p.HEADER_SIZE <= size <= avail

    def receive(self) -> Message:
        """The next message. Raises ConnectionError at end of stream (EOF), ProtocolError
        when the framing cannot be trusted (the connection must then be dropped),
        OSError from the socket."""
        if self._kept:
            self.consume()
        while True:
            start, avail = self._start, self._end - self._start
            need = p.HEADER_SIZE
            if self._exact and avail == 0:
                # At a message boundary: learn the size without taking anything, then
                # take the whole message in one read (see _fill).
                head = self._sock.recv(p.HEADER_SIZE, socket.MSG_PEEK | socket.MSG_WAITALL)
                if len(head) < p.HEADER_SIZE:
                    raise ConnectionError("end of stream")
                need = p.Header.unpack_from(head, 0, self._max_size).size
            elif avail >= p.HEADER_SIZE:
                header = p.Header.unpack_from(self._buf, start, self._max_size)
                if avail >= header.size:
                    return self._take(header)
                need = header.size
            self._fill(need)

    def _take(self, header: p.Header) -> Message:
        start = self._start
        payload = bytes(self._view[start + p.HEADER_SIZE : start + header.size])
        key = self._base + start
        message = Message(header, payload)
        if self._fds:
            message.fds = self._fds.pop(key, [])
        if self._truncated:
            message.fds_truncated = key in self._truncated
            self._truncated.discard(key)
        self._start = start + header.size
        if self._start == self._end:  # empty: start over at the front, no copy
            self._base += self._start
            self._start = self._end = 0
        return message

    def _fill(self, need: int) -> None:
        """Receive more, making room for a message of `need` bytes from _start."""
        if self._start + need > len(self._buf):
            self._compact(need)
        room = self._view[self._end :]
        peek = False
        if self._exact:
            # Take the message whole or not at all: wait until all of it (a header, then
            # the message) is in the socket. Then peek it whole; consume() takes it out
            # once it is handled. (The kernel ends a peek at an skb with fds; a message
            # split so is read instead, and the rest of it too: QEMU sends a message
            # with its fds in one piece.)
            room = self._view[self._end : self._start + need]
            if not self._sock.recv(len(room), socket.MSG_PEEK | socket.MSG_WAITALL):
                raise ConnectionError("end of stream")
            peek = self._start == self._end
        if peek:
            nbytes, ancdata, msg_flags, _ = self._sock.recvmsg_into(
                [room], _ANCILLARY_SPACE, _RECV_FLAGS | socket.MSG_PEEK
            )
            if nbytes == len(room):
                self._kept = nbytes
            else:
                close_fds(_passed_fds(ancdata))  # (the read below passes them anew)
                peek = False
        if not peek:
            nbytes, ancdata, msg_flags, _ = self._sock.recvmsg_into(
                [room], _ANCILLARY_SPACE, _RECV_FLAGS
            )
        fds = _passed_fds(ancdata)
        truncated = bool(msg_flags & socket.MSG_CTRUNC)
        if nbytes == 0:
            close_fds(fds)
            raise ConnectionError("end of stream")
        self._end += nbytes
        if fds or truncated:
            key = self._owner_of()
            self._fds.setdefault(key, []).extend(fds)
            if truncated:
                self._truncated.add(key)

    def consume(self) -> None:
        """Take the last message (handled now) out of the socket, if it is still
        there (exact mode). Its fds come again with it: closed (the peek gave them)."""
        kept, self._kept = self._kept, 0
        if kept:
            self._discard(kept)

    def _discard(self, nbytes: int) -> None:
        """Read `nbytes` that are in the socket already, closing their fds."""
        scratch = bytearray(min(nbytes, _BUFFER_SIZE))
        while nbytes:
            got, ancdata, _, _ = self._sock.recvmsg_into(
                [memoryview(scratch)[: min(nbytes, len(scratch))]], _ANCILLARY_SPACE, _RECV_FLAGS
            )
            close_fds(_passed_fds(ancdata))
            if not got:
                raise ConnectionError("end of stream")
            nbytes -= got

    def _owner_of(self) -> int:
        """Stream offset of the last message that starts before _end: the last one
        starting in the bytes just read or, if none does, the one they continue (a
        sender that passed fds mid-message; its fd count check will then fail)."""
        pos = owner = self._start
        while pos < self._end:
            owner = pos
            if pos + 8 > self._end:
                break
            size = int.from_bytes(self._buf[pos + 4 : pos + 8], "little")
            if size < p.HEADER_SIZE:
                break  # receive() reports the broken framing
            pos += size
        return self._base + owner

    def _compact(self, need: int) -> None:
        held = self._end - self._start
        if need > len(self._buf):
            self._view.release()
            grown = bytearray(max(need, 2 * len(self._buf)))
            grown[:held] = self._buf[self._start : self._end]
            self._buf = grown
            self._view = memoryview(self._buf)
        else:
            self._buf[:held] = self._buf[self._start : self._end]
        self._base += self._start
        self._start, self._end = 0, held

    def unread(self) -> tuple[bytes, list[tuple[int, list[int]]]]:
        """What was received and not yet taken, with the fds waiting in it (by offset in
        those bytes); they stay here too: for handing the stream to another reader."""
        self.consume()  # (handled: not for the other reader)
        first = self._base + self._start
        pending = [(key - first, fds) for key, fds in sorted(self._fds.items())]
        return bytes(self._view[self._start : self._end]), pending

    def preload(self, data: bytes, fds: dict[int, list[int]]) -> None:
        """Start with bytes another reader received from this stream (and their fds, by
        offset in `data`): they come before anything read from the socket."""
        if self._end != self._start:
            raise RuntimeError("preload() on a reader that has read")
        if len(data) > len(self._buf):
            self._buf = bytearray(len(data))
            self._view = memoryview(self._buf)
        self._buf[: len(data)] = data
        self._start, self._end = 0, len(data)
        self._fds = {self._base + offset: list(got) for offset, got in fds.items()}

    def close(self) -> None:
        """Close fds that never found their message."""
        pending, self._fds = self._fds, {}
        for fds in pending.values():
            close_fds(fds)


def _passed_fds(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    """The fds SCM_RIGHTS brought (recvmsg's ancillary data)."""
    fds = array.array("i")
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[: len(data) - len(data) % _INT_SIZE])
    return list(fds)


def send_message(sock: socket.socket, data: bytes, fds: Sequence[int] = ()) -> None:
    """One message, its fds passed with its first byte (see the module doc).
    Callers serialise senders on a socket."""
    if not fds:
        sock.sendall(data)
        return
    sent = sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
    if sent < len(data):
        sock.sendall(memoryview(data)[sent:])
