"""Message framing (vfio_user/framing.py): whole messages off a stream, buffered,
with each SCM_RIGHTS fd given to the message it came with."""

from __future__ import annotations

import itertools
import os
import socket
import struct
import threading
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nvme_mdev.vfio_user import protocol as p
from nvme_mdev.vfio_user.framing import MessageReader, send_message, wait_readable


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    a.settimeout(5)
    b.settimeout(5)
    yield a, b
    a.close()
    b.close()


def same_file(fd_a: int, fd_b: int) -> bool:
    sa, sb = os.fstat(fd_a), os.fstat(fd_b)
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def test_burst_of_messages_in_order(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    burst = b"".join(p.encode_message(i, p.Command.REGION_WRITE, bytes([i]) * i) for i in range(50))
    a.sendall(burst)
    reader = MessageReader(b)
    for i in range(50):
        m = reader.receive()
        assert (m.header.msg_id, m.payload, m.fds) == (i, bytes([i]) * i, [])
    assert not reader.buffered()


def test_fds_go_to_the_message_they_came_with(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    r, w = os.pipe()
    try:
        # Three messages queued before the reader looks: only the middle one has fds.
        send_message(a, p.encode_message(1, p.Command.DEVICE_RESET))
        send_message(a, p.encode_message(2, p.Command.DMA_MAP, bytes(32)), [r, w])
        send_message(a, p.encode_message(3, p.Command.DEVICE_RESET))
        send_message(a, p.encode_message(4, p.Command.DMA_MAP, bytes(32)), [w])
        reader = MessageReader(b)
        got = [reader.receive() for _ in range(4)]
        assert [len(m.fds) for m in got] == [0, 2, 0, 1]
        assert same_file(got[1].fds[0], r) and same_file(got[1].fds[1], w)
        assert same_file(got[3].fds[0], w)
        for m in got:
            m.close_fds()
    finally:
        os.close(r)
        os.close(w)


def test_large_message_grows_the_buffer(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    data = os.urandom(300_000)
    a.sendall(p.encode_message(9, p.Command.REGION_WRITE, data[:100]))

    reader = MessageReader(b)
    t = threading.Thread(
        target=a.sendall, args=(p.encode_message(10, p.Command.REGION_WRITE, data),)
    )
    t.start()
    assert reader.receive().payload == data[:100]
    assert reader.receive().payload == data
    t.join()


def test_end_of_stream(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    a.sendall(p.encode_message(1, p.Command.REGION_READ, bytes(16))[:20])
    a.shutdown(socket.SHUT_WR)
    with pytest.raises(ConnectionError):
        MessageReader(b).receive()


@pytest.mark.parametrize("size", [4, p.MAX_MESSAGE_SIZE + 1])
def test_broken_framing(pair: tuple[socket.socket, socket.socket], size: int) -> None:
    a, b = pair
    a.sendall(struct.pack("<HHIII", 1, 1, size, 0, 0))
    with pytest.raises(p.ProtocolError):
        MessageReader(b).receive()


def test_unclaimed_fds_are_closed(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    r, w = os.pipe()
    os.close(w)
    message = p.encode_message(1, p.Command.DMA_MAP, bytes(32))
    send_message(a, message[:20], [r])  # the rest never comes
    os.close(r)
    reader = MessageReader(b)
    b.settimeout(0.2)
    with pytest.raises(TimeoutError):
        reader.receive()
    before = len(os.listdir("/proc/self/fd"))
    reader.close()
    assert len(os.listdir("/proc/self/fd")) == before - 1


@settings(max_examples=40, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.integers(0, 70_000), st.booleans(), st.lists(st.integers(1, 9000), max_size=3)
        ),
        min_size=1,
        max_size=12,
    )
)
def test_any_split_of_the_stream_reads_back_the_same(
    plan: list[tuple[int, bool, list[int]]],
) -> None:
    """Messages of any size, sent in arbitrary pieces (fds with a message's first
    piece, as senders do), come out whole, in order, each with its own fds."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    b.settimeout(5)
    r, w = os.pipe()
    try:
        messages = [
            p.encode_message(i, p.Command.REGION_WRITE, bytes([i % 251]) * size)
            for i, (size, _, _) in enumerate(plan)
        ]

        def sender() -> None:
            for message, (_, with_fd, cuts) in zip(messages, plan, strict=True):
                points = sorted({c for c in cuts if c < len(message)} | {0, len(message)})
                for start, end in itertools.pairwise(points):
                    send_message(a, message[start:end], [r] if with_fd and start == 0 else ())

        t = threading.Thread(target=sender)
        t.start()
        reader = MessageReader(b)
        for i, (size, with_fd, _) in enumerate(plan):
            m = reader.receive()
            assert m.header.msg_id == i and m.payload == bytes([i % 251]) * size
            assert len(m.fds) == (1 if with_fd else 0)
            assert all(same_file(fd, r) for fd in m.fds)
            m.close_fds()
        t.join(5)
        reader.close()
    finally:
        for fd in (r, w):
            os.close(fd)
        a.close()
        b.close()


def test_waiting_on_an_fd_numbered_past_select_limit(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    """A daemon serving many VMs holds fds numbered past 1024, where select(2) fails
    (ValueError): the server's and the host driver's waits must still work there."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < 2048:
        pytest.skip(f"hard RLIMIT_NOFILE {hard}: cannot open fd 2000")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 2048), hard))
    a, b = pair
    high = os.dup2(b.fileno(), 2000)
    try:
        assert not wait_readable(high, 0)
        a.sendall(b"x")
        assert wait_readable(high, 5)
    finally:
        os.close(high)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_exact_reads_leave_a_message_in_the_socket_until_it_is_consumed(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    """A reader that dies between receive() and consume() (a crashed process) leaves
    the message whole for the next reader of the socket, fds and all; consume() takes
    it out and closes the fds it brings again."""
    a, b = pair
    r, w = os.pipe()
    try:
        send_message(a, p.encode_message(1, p.Command.DMA_MAP, bytes(32)), [r])
        send_message(a, p.encode_message(2, p.Command.REGION_WRITE, b"x" * 40))
        first = MessageReader(b, exact=True).receive()  # ... and then it "dies"
        assert first.header.msg_id == 1 and same_file(first.fds[0], r)
        first.close_fds()
        before = open_fds()
        reader = MessageReader(b, exact=True)
        again = reader.receive()
        assert again.header.msg_id == 1 and same_file(again.fds[0], r)
        reader.consume()
        assert open_fds() == before + 1  # the message's fd, not the copy consume() met
        again.close_fds()
        second = reader.receive()  # (consumes nothing more: consume() came first)
        assert (second.header.msg_id, second.payload) == (2, b"x" * 40)
        # receive() consumes the message before it, if nobody did.
        send_message(a, p.encode_message(3, p.Command.DEVICE_RESET))
        assert reader.receive().header.msg_id == 3
        reader.consume()
        a.close()
        with pytest.raises(ConnectionError):
            MessageReader(b, exact=True).receive()  # nothing was left behind
    finally:
        os.close(r)
        os.close(w)


def test_exact_reads_give_unread_bytes_without_the_handled_message(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    a, b = pair
    send_message(a, p.encode_message(1, p.Command.DEVICE_RESET))
    send_message(a, p.encode_message(2, p.Command.DEVICE_RESET))
    reader = MessageReader(b, exact=True)
    assert reader.receive().header.msg_id == 1
    assert reader.unread() == (b"", [])  # (exact: nothing read ahead)
    assert MessageReader(b, exact=True).receive().header.msg_id == 2  # 1 is out
