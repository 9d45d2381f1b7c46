"""The pieces of upgrade in place that need no second process: the state document's
checks, the channel's fd batches, a socket's unread bytes moving to another reader,
and storage descriptors inherited by key."""

from __future__ import annotations

import os
import socket

import pytest

from nvme_mdev.handover import descriptors
from nvme_mdev.handover.document import (
    FDS_PER_MESSAGE,
    Channel,
    HandoverError,
    check_document,
    new_document,
)
from nvme_mdev.vfio_user import protocol as p
from nvme_mdev.vfio_user.framing import MessageReader, send_message


def test_document_checks() -> None:
    doc = new_document(2, controllers=[])
    assert check_document(doc, 2) is doc
    with pytest.raises(HandoverError, match="state version 2 from nvme-mdev"):
        check_document({**doc, "version": 2}, 2)
    with pytest.raises(HandoverError, match="names 2 fds, 1 came"):
        check_document(doc, 1)
    with pytest.raises(HandoverError, match="not an nvme-mdev state document"):
        check_document({"version": 1}, 0)


def test_channel_carries_more_fds_than_one_message_can() -> None:
    a, b = socket.socketpair()
    sent = [os.open("/dev/null", os.O_RDONLY) for _ in range(2 * FDS_PER_MESSAGE + 3)]
    try:
        Channel(a).send({"hello": 1}, sent)
        message, got = Channel(b).receive(5)
        assert message == {"hello": 1} and len(got) == len(sent)
        assert all(
            os.path.samestat(os.fstat(x), os.fstat(y)) for x, y in zip(sent, got, strict=True)
        )
        for fd in got:
            os.close(fd)
    finally:
        for fd in sent:
            os.close(fd)
        a.close()
        b.close()


def test_channel_reports_a_truncated_message() -> None:
    a, b = socket.socketpair()
    a.sendall((100).to_bytes(4, "little") + (0).to_bytes(4, "little") + b'{"format"')
    a.close()
    with pytest.raises(HandoverError, match="went away"):
        Channel(b).receive(5)
    b.close()


def test_unread_bytes_and_their_fds_move_to_another_reader() -> None:
    a, b = socket.socketpair()
    fd = os.open("/dev/null", os.O_RDONLY)
    try:
        for i in range(3):
            data = p.encode_message(i, p.Command.DMA_MAP, bytes(32))
            send_message(a, data, [fd] if i == 2 else [])
        first = MessageReader(b)
        assert first.receive().header.msg_id == 0
        unread, pending = first.unread()
        second = MessageReader(b)
        second.preload(unread, dict(pending))
        one, two = second.receive(), second.receive()
        assert (one.header.msg_id, two.header.msg_id) == (1, 2)
        assert one.fds == [] and len(two.fds) == 1
        os.close(two.fds[0])
    finally:
        os.close(fd)
        a.close()
        b.close()


def test_inherited_storage_descriptors_are_taken_by_key(tmp_path: object) -> None:
    path = os.path.join(str(tmp_path), "img")
    with open(path, "wb") as f:
        f.write(b"x")
    flags = os.O_RDWR | os.O_CLOEXEC
    original = descriptors.open_fd(path, flags, "writer a")
    try:
        ((key, fd),) = [(k, f) for k, f in descriptors.held() if f == original]
        descriptors.inherit([(key, os.dup(fd))])
        other = descriptors.open_fd(path, flags, "writer b")  # another key: a fresh open
        same = descriptors.open_fd(path, flags, "writer a")  # the inherited description
        assert os.lseek(original, 1, os.SEEK_SET) == 1
        assert os.lseek(same, 0, os.SEEK_CUR) == 1  # one file position: one description
        assert os.lseek(other, 0, os.SEEK_CUR) == 0
        assert descriptors.close_unclaimed() == 0
        descriptors.close_fd(other)
        descriptors.close_fd(same)
    finally:
        descriptors.close_fd(original)
    assert all(f not in (original, other, same) for _, f in descriptors.held())
