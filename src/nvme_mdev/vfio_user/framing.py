"""Whole vfio-user messages off a UNIX socket, with the fds that came along.
Both ends (server.py, client.py) frame messages this one way."""

from __future__ import annotations

import array
import os
import socket
import struct

from . import protocol as p

_FD_SPACE = socket.CMSG_SPACE(p.MAX_MSG_FDS * struct.calcsize("i"))


def receive_message(sock: socket.socket) -> tuple[p.Header, bytes, list[int]]:
    """The next message: header, payload and the fds passed with it (the caller owns
    them). Raises ConnectionError at end of stream, ProtocolError for a bad header."""
    fds: list[int] = []
    try:
        header = p.Header.decode(_read_exactly(sock, p.HEADER_SIZE, fds))
        payload = _read_exactly(sock, header.size - p.HEADER_SIZE, fds)
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return header, payload, fds


def _read_exactly(sock: socket.socket, count: int, fds: list[int]) -> bytes:
    buf = bytearray()
    while len(buf) < count:
        data, ancdata, _, _ = sock.recvmsg(count - len(buf), _FD_SPACE)
        for level, kind, cdata in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                got = array.array("i")
                got.frombytes(cdata[: len(cdata) - len(cdata) % got.itemsize])
                fds.extend(got)
        if not data:
            raise ConnectionError("peer closed the connection")
        buf += data
    return bytes(buf)


def send_message(sock: socket.socket, data: bytes, fds: list[int] | None = None) -> None:
    if fds:
        sent = sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
        if sent < len(data):
            sock.sendall(data[sent:])
    else:
        sock.sendall(data)
