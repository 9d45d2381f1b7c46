"""The state document a process hands to its successor, and the channel it goes over.

The document is JSON, self-describing and versioned:

    {"format": "nvme-mdev-state", "version": 1, "writer": "nvme-mdev 0.1.0",
     "fds": N, "control": {...}, "metrics": {...}, "storage": [...],
     "controllers": [...]}

Every fd in it is an index into the N fds that travel with it (SCM_RIGHTS). A reader
refuses a document of another format or version, or one whose fds did not all come,
with one line that says so; the writer then goes on serving.

The channel is a UNIX stream socket pair: a message is a header (JSON length, fd
count), the JSON, then the fds, at most FDS_PER_MESSAGE per one-byte carrier message.
"""

from __future__ import annotations

import array
import json
import os
import socket
import struct
from collections.abc import Sequence
from typing import Any, Final

from .. import __version__
from ..vfio_user.framing import close_fds

FORMAT: Final = "nvme-mdev-state"
#: the version this code writes; READS: those it can read
VERSION: Final = 1
READS: Final = frozenset({1})
#: below the kernel's SCM_MAX_FD (253)
FDS_PER_MESSAGE: Final = 250
_HEADER: Final = struct.Struct("<II")
#: a document is at most this long (a daemon with a thousand controllers is ~10 MB)
MAX_DOCUMENT: Final = 256 << 20


class HandoverError(Exception):
    """The handover cannot go on; the message says why in one line."""


def new_document(fd_count: int, **sections: Any) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "version": VERSION,
        "writer": f"nvme-mdev {__version__}",
        "fds": fd_count,
        **sections,
    }


def check_document(doc: object, fds_received: int) -> dict[str, Any]:
    """`doc` if this code can take it over; HandoverError otherwise."""
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise HandoverError("not an nvme-mdev state document")
    version = doc.get("version")
    if version not in READS:
        raise HandoverError(
            f"state version {version!r} from {doc.get('writer', '?')}: this nvme-mdev "
            f"({__version__}) reads version {', '.join(map(str, sorted(READS)))}"
        )
    if doc.get("fds") != fds_received:
        raise HandoverError(f"state document names {doc.get('fds')} fds, {fds_received} came")
    return doc


class Channel:
    """One end of the handover socket pair."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def peer_is_us(self) -> bool:
        """Whether the other end runs as our user (SO_PEERCRED)."""
        creds = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        _pid, uid, _gid = struct.unpack("3i", creds)
        return bool(uid == os.geteuid())

    def send(self, message: dict[str, Any], fds: Sequence[int] = ()) -> None:
        data = json.dumps(message, separators=(",", ":")).encode()
        self.sock.sendall(_HEADER.pack(len(data), len(fds)) + data)
        for i in range(0, len(fds), FDS_PER_MESSAGE):
            batch = array.array("i", fds[i : i + FDS_PER_MESSAGE])
            self.sock.sendmsg([b"F"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, batch)])

    def receive(self, timeout: float | None) -> tuple[dict[str, Any], list[int]]:
        """The next message and its fds (ours to close). HandoverError if the peer
        went away, took longer than `timeout` seconds, or sent something malformed."""
        self.sock.settimeout(timeout)
        try:
            length, count = _HEADER.unpack(self._exactly(_HEADER.size))
            if length > MAX_DOCUMENT:
                raise HandoverError(f"a message of {length} bytes")
            data = self._exactly(length)
            fds: list[int] = []
            while len(fds) < count:
                fds.extend(self._fds(count - len(fds)))
        except TimeoutError:
            raise HandoverError(f"no answer within {timeout:g} s") from None
        except OSError as exc:
            raise HandoverError(f"handover socket: {exc.strerror or exc}") from None
        try:
            message = json.loads(data)
        except ValueError as exc:
            close_fds(fds)
            raise HandoverError(f"a malformed message: {exc}") from None
        if not isinstance(message, dict):
            close_fds(fds)
            raise HandoverError("a malformed message: not an object")
        return message, fds

    def _exactly(self, n: int) -> bytes:
        out = bytearray()
        while len(out) < n:
            chunk = self.sock.recv(n - len(out))
            if not chunk:
                raise HandoverError("the other process went away (truncated message)")
            out += chunk
        return bytes(out)

    def _fds(self, most: int) -> list[int]:
        size = socket.CMSG_SPACE(min(most, FDS_PER_MESSAGE) * array.array("i").itemsize)
        data, ancdata, _flags, _ = self.sock.recvmsg(1, size, socket.MSG_CMSG_CLOEXEC)
        if not data:
            raise HandoverError("the other process went away (fds missing)")
        got = array.array("i")
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                got.frombytes(payload[: len(payload) - len(payload) % got.itemsize])
        if not got:
            raise HandoverError("an fd message without fds")
        return list(got)

    def close(self) -> None:
        self.sock.close()
