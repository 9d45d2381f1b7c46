"""More of the vfio-user server over a real socket: SET_IRQS refusals, stray fds,
truncated payloads of every command, DMA_UNMAP inside the device's quiesce, the
DMA_READ size limit QEMU needs, and random requests over a live connection."""

from __future__ import annotations

import contextlib
import errno
import os
import select
import socket
import struct
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_vfio_user_protocol import QEMU_VERSION
from vfio_user_fakes import FakeDevice

from nvme_mdev.guest_memory import DmaError
from nvme_mdev.vfio_user import protocol as p
from nvme_mdev.vfio_user.client import GuestRam, VfioUserClient
from nvme_mdev.vfio_user.device import RegionIndex
from nvme_mdev.vfio_user.framing import MessageReader, send_message
from nvme_mdev.vfio_user.server import DMA_READ_MAX, VfioUserServer

PAGE = 4096
BAR0 = RegionIndex.BAR0


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def call(client: VfioUserClient, command: int, payload: bytes, fds: list[int] | None = None) -> int:
    """The reply's errno (0: success); the reply must be a bare header if an error."""
    reply = client.request(command, payload, fds or (), check=False)
    if reply.header.is_error:
        assert reply.header.size == p.HEADER_SIZE and not reply.fds
        return reply.header.error
    return 0


# --- SET_IRQS -------------------------------------------------------------------------------

EVENTFD_TRIGGER = p.IRQ_SET_DATA_EVENTFD | p.IRQ_SET_ACTION_TRIGGER


def test_set_irqs_bad_requests_get_error_replies(
    client: VfioUserClient, device: FakeDevice
) -> None:
    before = open_fds()
    efds = [os.eventfd(0, os.EFD_CLOEXEC) for _ in range(3)]
    none = p.IRQ_SET_DATA_NONE
    cases: list[tuple[bytes, list[int]]] = [
        # two data types / two actions / an unknown flag / no action
        (p.IRQ_SET.pack(20, none | p.IRQ_SET_DATA_BOOL | 0x20, 2, 0, 1), []),
        (p.IRQ_SET.pack(20, none | p.IRQ_SET_ACTION_MASK | p.IRQ_SET_ACTION_UNMASK, 2, 0, 1), []),
        (p.IRQ_SET.pack(20, none | p.IRQ_SET_ACTION_TRIGGER | 0x40, 2, 0, 1), []),
        (p.IRQ_SET.pack(20, none, 2, 0, 1), []),
        # DATA_BOOL with too few bytes / argsz that disagrees
        (p.IRQ_SET.pack(22, p.IRQ_SET_DATA_BOOL | p.IRQ_SET_ACTION_MASK, 2, 0, 3) + b"\1\0", []),
        (p.IRQ_SET.pack(20, p.IRQ_SET_DATA_BOOL | p.IRQ_SET_ACTION_MASK, 2, 0, 1) + b"\1", []),
        # count 0 is only DATA_NONE | TRIGGER
        (p.IRQ_SET.pack(20, EVENTFD_TRIGGER, 2, 0, 0), []),
        # eventfds: 2 for 3 vectors; fds with DATA_NONE
        (p.IRQ_SET.pack(20, EVENTFD_TRIGGER, 2, 0, 3), efds[:2]),
        (p.IRQ_SET.pack(20, none | p.IRQ_SET_ACTION_TRIGGER, 2, 0, 1), efds[:1]),
        # no such index / vectors past the end / start past the end
        (p.IRQ_SET.pack(20, EVENTFD_TRIGGER, 5, 0, 1), efds[:1]),
        (p.IRQ_SET.pack(20, EVENTFD_TRIGGER, 2, 19, 2), efds[:2]),
        (p.IRQ_SET.pack(20, none | p.IRQ_SET_ACTION_UNMASK, 0, 1, 1), []),
        (p.IRQ_SET.pack(20, none | p.IRQ_SET_ACTION_UNMASK, 0, 1 << 31, 1), []),
        # truncated
        (p.IRQ_SET.pack(20, EVENTFD_TRIGGER, 2, 0, 1)[:16], efds[:1]),
    ]
    for payload, fds in cases:
        assert call(client, p.Command.DEVICE_SET_IRQS, payload, fds) == errno.EINVAL, payload.hex()
    assert not device.irq_requests
    for fd in efds:
        os.close(fd)
    assert open_fds() == before  # the server closed every copy it was sent
    # and it still serves
    client.set_irqs(2, p.IRQ_SET_ACTION_TRIGGER, 0, 2, fds=[-1, -1])
    assert len(device.irq_requests) == 1


def test_eventfd_trigger_without_fds_detaches_every_vector(
    client: VfioUserClient, device: FakeDevice
) -> None:
    fds = client.enable_msix(5)
    try:
        assert (
            call(client, p.Command.DEVICE_SET_IRQS, p.IRQ_SET.pack(20, EVENTFD_TRIGGER, 2, 0, 5))
            == 0
        )
    finally:
        for fd in fds:
            os.close(fd)
    last = device.irq_requests[-1]
    assert (last.index, last.start, last.count, list(last.fds or ())) == (2, 0, 5, [-1] * 5)
    assert not any(k[0] == 2 for k in device.fds)


def test_eventfds_are_usable_by_the_device(client: VfioUserClient, device: FakeDevice) -> None:
    fd = client.enable_intx()
    try:
        device.signal(0, 0)
        device.signal(0, 0)
        assert os.eventfd_read(fd) == 2  # the same eventfd, on both sides
        os.eventfd_write(fd, 7)
        with device.lock:
            theirs = device.fds[(0, 0)]
        assert theirs != fd and os.eventfd_read(theirs) == 7
    finally:
        os.close(fd)


# --- stray fds and truncated payloads ------------------------------------------------------


def test_fds_with_commands_that_take_none_are_closed(
    server: VfioUserServer, client: VfioUserClient, device: FakeDevice
) -> None:
    before = open_fds()
    efds = [os.eventfd(0, os.EFD_CLOEXEC) for _ in range(4)]
    ram = GuestRam(PAGE)
    cases: list[tuple[int, bytes, list[int], bool]] = [
        (p.Command.DEVICE_RESET, b"", efds[:1], False),
        (p.Command.DEVICE_GET_INFO, p.DeviceInfo().encode(), efds[:2], False),
        (p.Command.DEVICE_GET_REGION_INFO, p.RegionInfoRequest(0).encode(), efds[:1], False),
        (p.Command.DEVICE_GET_IRQ_INFO, p.IrqInfo(2).encode(), efds[:1], False),
        (p.Command.REGION_READ, p.RegionAccess(BAR0, 0, 4).encode(), efds[:1], False),
        (p.Command.REGION_WRITE, p.RegionAccess(BAR0, 0, 4, b"abcd").encode(), efds[:1], False),
        (p.Command.DMA_UNMAP, p.DmaUnmap(0, 0, PAGE).encode(), efds[:1], False),
        (p.Command.DMA_MAP, p.DmaMap(3, 0, 0, PAGE).encode(), [ram.fd, efds[0]], False),
        (99, b"", efds[:3], False),
        (p.Command.VERSION, b"", efds[:1], False),
        # posted: no reply, the fds closed all the same
        (p.Command.REGION_WRITE, p.RegionAccess(BAR0, 0, 4, b"wxyz").encode(), efds[:1], True),
        (p.Command.REGION_WRITE_MULTI, p.WRITE_MULTI_COUNT.pack(0), efds[:4], True),
    ]
    for command, payload, fds, posted in cases:
        if posted:
            client.request(command, payload, fds, no_reply=True)
        else:
            assert call(client, command, payload, fds) != 0, command
    assert client.read32(BAR0, 0) == 0  # neither write happened
    assert not device.writes and device.resets == 0 and not server.memory.regions
    for fd in efds:
        os.close(fd)
    ram.close()
    assert open_fds() == before


@pytest.mark.parametrize(
    ("command", "payload"),
    [
        (p.Command.VERSION, b"\0\0"),
        (p.Command.DMA_MAP, p.DmaMap(3, 0, 0, PAGE).encode()[:-1]),
        (p.Command.DMA_UNMAP, p.DmaUnmap(0, 0, PAGE).encode()[:20]),
        (p.Command.DEVICE_GET_INFO, p.DeviceInfo().encode()[:12]),
        (p.Command.DEVICE_GET_REGION_INFO, p.RegionInfoRequest(0).encode()[:8]),
        (p.Command.DEVICE_GET_IRQ_INFO, p.IrqInfo(2).encode()[:4]),
        (p.Command.DEVICE_SET_IRQS, p.IRQ_SET.pack(20, 0x21, 0, 0, 0)[:19]),
        (p.Command.REGION_READ, p.RegionAccess(BAR0, 0, 4).encode()[:15]),
        (p.Command.REGION_WRITE, p.RegionAccess(BAR0, 0, 4, b"abcd").encode()[:-1]),
        (p.Command.REGION_WRITE, p.RegionAccess(BAR0, 0, 4, b"abcd").encode()[:10]),
        (p.Command.REGION_WRITE_MULTI, p.WRITE_MULTI_COUNT.pack(1) + bytes(23)),
        (p.Command.REGION_WRITE_MULTI, b"\1"),
        (p.Command.DEVICE_RESET, b"\0"),  # too long, rather
    ],
)
def test_truncated_payloads_get_einval(
    client: VfioUserClient, device: FakeDevice, command: int, payload: bytes
) -> None:
    assert call(client, command, payload) == errno.EINVAL
    assert call(client, p.Command.DEVICE_GET_INFO, p.DeviceInfo().encode()) == 0  # still serving
    assert not device.writes and device.resets == 0


# --- guest memory ---------------------------------------------------------------------------


class QuiesceRecorder(FakeDevice):
    """Records the server's DMA table as the device's quiesce begins and ends."""

    def __init__(self) -> None:
        super().__init__()
        self.server: VfioUserServer | None = None
        self.seen: list[tuple[str, tuple[tuple[int, int, bool], ...]]] = []

    def _snapshot(self, when: str) -> None:
        assert self.server is not None
        regions = self.server.memory.regions
        self.seen.append((when, tuple((r.iova, r.size, r.mapping is not None) for r in regions)))

    @contextlib.contextmanager
    def _recording(self) -> Iterator[None]:
        self._snapshot("enter")
        yield
        self._snapshot("exit")

    def quiesced(self) -> contextlib.AbstractContextManager[None]:
        return self._recording()


def test_dma_unmap_happens_inside_the_quiesce(sock_dir: Path) -> None:
    device = QuiesceRecorder()
    ram = GuestRam(4 * PAGE, base=0x100000)
    try:
        with VfioUserServer(str(sock_dir / "q"), device) as server:
            device.server = server
            server.start()
            with VfioUserClient(server.socket_path, timeout=5) as c:
                c.negotiate()
                c.dma_map(ram)
                c.dma_map_fd(0x200000, PAGE, ram.fd, PAGE)
                (region,) = [r for r in server.memory.regions if r.iova == 0x100000]
                c.dma_unmap(0x100000, 4 * PAGE)
                both = ((0x100000, 4 * PAGE, True), (0x200000, PAGE, True))
                assert device.seen == [("enter", both), ("exit", both[1:])]
                assert region.mapping is None  # munmapped before the quiesce ended
                with pytest.raises(DmaError):
                    server.memory.read(0x100000, 1)
                assert server.memory.read(0x200000, 4) == ram.read(0x100000 + PAGE, 4)
                device.seen.clear()
                c.dma_unmap_all()
                assert device.seen == [("enter", both[1:]), ("exit", ())]
    finally:
        ram.close()
        device.close()


def test_dma_read_chunks_fit_qemus_send_buffer(
    server: VfioUserServer, client: VfioUserClient
) -> None:
    """The client allows 1 MiB per transfer, but QEMU cannot send a DMA_READ reply
    bigger than its socket buffer whole (see server.DMA_READ_MAX)."""
    assert client.server_caps.max_data_xfer_size == 1 << 20
    buf = client.add_message_region(0, 4 * DMA_READ_MAX)
    buf[:] = os.urandom(len(buf))
    assert server.memory.read(0, len(buf)) == bytes(buf)
    assert client.dma_reads == 4
    server.memory.write(0, bytes(len(buf)))  # DMA_WRITE: one message
    assert client.dma_writes == 1 and not any(buf)


def test_dma_map_read_only_memfd(server: VfioUserServer, client: VfioUserClient) -> None:
    ram = GuestRam(2 * PAGE, base=0x40000)
    try:
        client.dma_map(ram, writable=False)
        ram.write(0x40000, b"rom")
        assert server.memory.read(0x40000, 3) == b"rom"
        with pytest.raises(DmaError):
            server.memory.write(0x40000, b"x")
        with pytest.raises(DmaError):
            server.memory.view(0x40000, 4, True)
        view = server.memory.view(0x40000, 4, False)
        assert view is not None and view.readonly and bytes(view[:3]) == b"rom"
        view.release()
    finally:
        ram.close()


# --- random requests over a live connection ------------------------------------------------


@pytest.fixture(scope="module")
def live() -> Iterator[tuple[VfioUserClient, FakeDevice]]:
    directory = tempfile.mkdtemp(prefix="vu-", dir="/tmp")
    device = FakeDevice()
    server = VfioUserServer(os.path.join(directory, "fuzz"), device)
    server.start()
    client = VfioUserClient(server.socket_path, timeout=5)
    client.negotiate()
    yield client, device
    client.close()
    server.stop()
    device.close()
    os.rmdir(directory)


_COMMANDS = st.sampled_from([int(c) for c in p.Command] + [0, 19, 0xFFFF])


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(_COMMANDS, st.binary(max_size=80), st.integers(0, 2))
def test_random_requests_over_the_socket(
    live: tuple[VfioUserClient, FakeDevice], command: int, payload: bytes, nfds: int
) -> None:
    """Every request gets its reply (never EIO, which means an unexpected exception
    in the server) and the connection stays in step."""
    client, _ = live
    fds = [os.eventfd(0, os.EFD_CLOEXEC) for _ in range(nfds)]
    try:
        reply = client.request(command, payload, fds, check=False)
    finally:
        for fd in fds:
            os.close(fd)
    for fd in reply.fds:
        os.close(fd)
    assert reply.header.command == command
    assert not (reply.header.is_error and reply.header.error == errno.EIO), (command, payload)
    assert client.read32(RegionIndex.CONFIG, 0) == 0x00101B36


def test_socket_peer_sees_eof_on_stop(sock_dir: Path, device: FakeDevice) -> None:
    server = VfioUserServer(str(sock_dir / "e"), device)
    server.start()
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    s.connect(server.socket_path)
    s.sendall(p.encode_message(0, p.Command.VERSION, struct.pack("<HH", 0, 0)))
    assert len(s.recv(64)) >= p.HEADER_SIZE
    server.stop()
    assert s.recv(64) == b""  # dropped, not left hanging
    s.close()
    assert device.resets == 1


def test_one_dma_read_in_flight(server: VfioUserServer) -> None:
    """Threads reading through messages at once: the next DMA_READ goes out only
    once the previous one is answered (QEMU truncates replies that pile up)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(5)
    sock.connect(server.socket_path)
    reader = MessageReader(sock)
    try:
        send_message(sock, p.encode_message(0, p.Command.VERSION, QEMU_VERSION))
        assert not reader.receive().header.is_error
        send_message(sock, p.encode_message(1, p.Command.DMA_MAP, p.DmaMap(3, 0, 0, PAGE).encode()))
        assert not reader.receive().header.is_error
        results: list[bytes | BaseException] = []

        def worker(i: int) -> None:
            try:
                results.append(server.memory.read(i * 8, 8))
            except BaseException as exc:  # reported below
                results.append(exc)

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        for _ in threads:
            request = reader.receive()
            assert request.header.command == p.Command.DMA_READ
            assert not select.select([sock], [], [], 0.2)[0]  # nothing else meanwhile
            access = p.DmaAccess.decode(request.payload, with_data=False)
            answer = p.DmaAccess(access.address, access.count, bytes([access.address]) * 8)
            send_message(
                sock,
                p.encode_message(
                    request.header.msg_id, p.Command.DMA_READ, answer.encode(), reply=True
                ),
            )
        for t in threads:
            t.join(5)
        assert sorted(results) == [bytes([i * 8]) * 8 for i in range(3)]  # type: ignore[type-var]
    finally:
        reader.close()
        sock.close()


# --- GET_REGION_INFO as SPDK's initiator sends it ----------------------------------------


def test_region_info_with_the_reply_buffer_as_payload(client: VfioUserClient) -> None:
    """SPDK's VFIOUSER initiator sends its whole reply buffer as the payload (argsz =
    buffer size): the answer is the one a 32-byte request with that argsz gets."""
    size = 4096
    spdk = p.REGION_INFO.pack(size, 0, 0, 0, 0, 0) + bytes(size - p.REGION_INFO.size)
    reply = client.request(p.Command.DEVICE_GET_REGION_INFO, spdk, check=False)
    assert not reply.header.is_error
    qemu = client.request(
        p.Command.DEVICE_GET_REGION_INFO, p.RegionInfoRequest(0, size).encode(), check=False
    )
    assert bytes(reply.payload) == bytes(qemu.payload)
    _argsz, _flags, index, _cap, region_size, _offset = p.REGION_INFO.unpack_from(reply.payload)
    assert index == 0 and region_size > 0
    for fd in (*reply.fds, *qemu.fds):
        os.close(fd)
