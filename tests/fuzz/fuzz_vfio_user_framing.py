#!/usr/bin/env python3
"""Fuzz target `vfio_user_framing`: framing.MessageReader cutting a byte stream into
messages, with the fds of SCM_RIGHTS attributed to them.

Input: a byte giving the reader's size limit, then chunks: [u16 length, fd byte,
bytes]: what one recvmsg() returns (the fd byte: how many fds come with it, and
whether the kernel truncated them). A fake socket serves the chunks and then the
end of the stream; the fds are -1 (framing only counts and hands them on).

Invariants: receive() returns whole messages or raises ConnectionError (the end)
or ProtocolError (framing that cannot be trusted), nothing else; the messages are
the stream's prefix, in order, each header's size its own length; every fd handed
in ends up with exactly one message or is closed by close(); when buffered() says
"whole message here", receive() does not read (it returns it, or refuses its size).
"""

from __future__ import annotations

import array
import socket
import sys

import fuzzing

with fuzzing.instrumented(__name__):
    from nvme_mdev.vfio_user import framing
    from nvme_mdev.vfio_user import protocol as p

_NO_FD = array.array("i", [-1])


class _Socket:
    """recvmsg_into() over prepared chunks, as the kernel would return them."""

    def __init__(self, chunks: list[tuple[bytes, int, bool]]) -> None:
        self.chunks = chunks
        self.fds_given = 0
        self.reads = 0

    def recvmsg_into(
        self, buffers: list[memoryview], ancbufsize: int, flags: int
    ) -> tuple[int, list[tuple[int, int, bytes]], int, None]:
        self.reads += 1
        (buffer,) = buffers
        assert len(buffer) > 0, "a read into no room"
        if not self.chunks:
            return 0, [], 0, None
        data, nfds, truncated = self.chunks[0]
        n = min(len(buffer), len(data))
        buffer[:n] = data[:n]
        ancdata: list[tuple[int, int, bytes]] = []
        if nfds:  # fds come with the read that takes a chunk's first byte
            ancdata.append((socket.SOL_SOCKET, socket.SCM_RIGHTS, (_NO_FD * nfds).tobytes()))
            self.fds_given += nfds
        if n < len(data):
            self.chunks[0] = (data[n:], 0, False)
        else:
            self.chunks.pop(0)
        return n, ancdata, socket.MSG_CTRUNC if truncated else 0, None


def fuzz(data: bytes) -> None:
    source = fuzzing.Input(data)
    max_size = p.HEADER_SIZE + source.u16()
    chunks: list[tuple[bytes, int, bool]] = []
    while source.remaining():
        length, fds = source.u16() % 4096, source.u8()
        chunk = source.take(length)
        if chunk:
            chunks.append((chunk, fds & 0x7, bool(fds & 0x80)))
    stream = b"".join(c for c, _, _ in chunks)
    sock = _Socket(chunks)
    reader = framing.MessageReader(sock, max_size)  # type: ignore[arg-type]
    pos = 0
    fds_taken = 0
    while True:
        whole = reader.buffered()
        reads = sock.reads
        try:
            message = reader.receive()
        except ConnectionError:
            assert not whole
            # the end: whatever is left is less than a message
            rest = stream[pos:]
            if len(rest) >= p.HEADER_SIZE:
                assert int.from_bytes(rest[4:8], "little") > len(rest)
            break
        except p.ProtocolError:
            # (buffered() may say yes to a message over the size limit: receive() then
            # refuses it at once, without a read, which is all buffered() promises)
            assert sock.reads == reads or not whole
            size = int.from_bytes(stream[pos + 4 : pos + 8], "little")
            assert len(stream) - pos >= p.HEADER_SIZE
            assert not p.HEADER_SIZE <= size <= max_size, size
            break
        if whole:
            assert sock.reads == reads, "buffered() promised a message without a read"
        header = message.header
        assert header.size == p.HEADER_SIZE + len(message.payload) <= max_size
        assert stream[pos : pos + header.size] == header.encode() + message.payload
        assert all(fd == -1 for fd in message.fds)
        fds_taken += len(message.fds)
        pos += header.size
        message.close_fds()
    pending = sum(len(fds) for fds in reader._fds.values())
    assert fds_taken + pending == sock.fds_given, (fds_taken, pending, sock.fds_given)
    reader.close()
    assert not reader._fds


if __name__ == "__main__":
    fuzzing.main(fuzz)
    sys.exit(0)
