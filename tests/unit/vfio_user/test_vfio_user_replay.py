"""A process that dies while it handles a vfio-user request (crash recovery): with exact
reads the request stays in the socket until it is answered, and the journal records
each request answered, so the successor handles the one that was not answered, and
skips the one that was answered and not yet taken out. A request handled again that
finds its work done (a DMA_MAP in place, a DMA_UNMAP gone) succeeds."""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from vfio_user_fakes import FakeDevice

from nvme_mdev.handover.journal import Journal
from nvme_mdev.vfio_user import protocol as p
from nvme_mdev.vfio_user.framing import MessageReader, send_message
from nvme_mdev.vfio_user.memory import DmaMemory
from nvme_mdev.vfio_user.server import Session, VfioUserServer

IOVA, SIZE = 0x100000, 0x4000
RW = p.DMA_MAP_FLAG_READ | p.DMA_MAP_FLAG_WRITE


@pytest.fixture
def memfd() -> Iterator[int]:
    fd = os.memfd_create("guest", os.MFD_CLOEXEC)
    os.ftruncate(fd, 2 * SIZE)
    yield fd
    os.close(fd)


class Resumed:
    """A server that goes on with a session after a crash: `answered_before` is the last
    request the journal says the dead process answered. The test is the client."""

    def __init__(self, sock_dir: Path, device: FakeDevice, answered_before: int | None) -> None:
        self.client, theirs = socket.socketpair()
        self.client.settimeout(5)
        self.journal = Journal.create(queues=2)
        if answered_before is not None:
            self.journal.answered(answered_before)
        session = Session(theirs, exact=True)
        session.negotiated = True
        session.replayed(self.journal)
        self.memory = DmaMemory()
        self.server = VfioUserServer(
            str(sock_dir / "s"), device, self.memory, session=session, exact_reads=True
        )
        self.server.journal = self.journal
        self.reader = MessageReader(self.client)

    def send(self, msg_id: int, command: int, payload: bytes, fds: Sequence[int] = ()) -> None:
        send_message(self.client, p.encode_message(msg_id, command, payload), fds)

    def reply(self) -> p.Header:
        message = self.reader.receive()
        assert message.header.is_reply
        return message.header

    def __enter__(self) -> Resumed:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.server.stop()
        self.reader.close()
        self.client.close()
        self.journal.close()
        os.close(self.journal.fd)


def dma_map(offset: int = 0) -> bytes:
    return p.DmaMap(RW, offset, IOVA, SIZE).encode()


def test_a_request_answered_before_the_crash_is_skipped(
    sock_dir: Path, device: FakeDevice, memfd: int
) -> None:
    with Resumed(sock_dir, device, answered_before=7) as resumed:
        resumed.send(7, p.Command.DMA_MAP, dma_map(), [memfd])  # answered by the dead one
        resumed.send(8, p.Command.DEVICE_RESET, b"")
        resumed.server.start()
        assert resumed.reply().msg_id == 8  # none for 7
        assert resumed.memory.regions == ()  # 7 was not handled again
        assert resumed.journal.last_answered() == 8


def test_a_request_not_answered_is_handled_again(
    sock_dir: Path, device: FakeDevice, memfd: int
) -> None:
    """The dead process mapped the region (the checkpoint has it) and died before it
    answered: the DMA_MAP, handled again, succeeds; the same DMA_MAP sent anew is the
    client's mistake and fails as ever."""
    with Resumed(sock_dir, device, answered_before=6) as resumed:
        resumed.memory.map(IOVA, SIZE, True, True, os.dup(memfd), 0)
        resumed.send(7, p.Command.DMA_MAP, dma_map(), [memfd])
        resumed.send(8, p.Command.DMA_MAP, dma_map(), [memfd])
        resumed.server.start()
        first, second = resumed.reply(), resumed.reply()
        assert (first.msg_id, first.error) == (7, 0)
        assert (second.msg_id, second.error) == (8, errno.EEXIST)
        assert len(resumed.memory.regions) == 1
        assert resumed.journal.last_answered() == 8


def test_a_replayed_dma_map_of_another_file_or_offset_is_refused(
    sock_dir: Path, device: FakeDevice, memfd: int
) -> None:
    with Resumed(sock_dir, device, answered_before=None) as resumed:
        resumed.memory.map(IOVA, SIZE, True, True, os.dup(memfd), 0)
        resumed.send(0, p.Command.DMA_MAP, dma_map(offset=SIZE), [memfd])
        resumed.server.start()
        header = resumed.reply()
        assert (header.msg_id, header.error) == (0, errno.EEXIST)


def test_a_replayed_dma_unmap_of_what_is_gone_succeeds(sock_dir: Path, device: FakeDevice) -> None:
    with Resumed(sock_dir, device, answered_before=3) as resumed:
        unmap = p.DmaUnmap(0, IOVA, SIZE).encode()
        resumed.send(4, p.Command.DMA_UNMAP, unmap)
        resumed.send(5, p.Command.DMA_UNMAP, unmap)
        resumed.server.start()
        first, second = resumed.reply(), resumed.reply()
        assert (first.msg_id, first.error) == (4, 0)
        assert (second.msg_id, second.error) == (5, errno.ENOENT)
