"""The vfio-user server over a real socket, with a fake device, driven by the
project's client and by a raw socket for what a well-behaved client never sends."""

from __future__ import annotations

import errno
import json
import os
import select
import socket
import stat
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_vfio_user_protocol import QEMU_VERSION
from vfio_user_fakes import BAR0_SIZE, MSIX_VECTORS, FakeDevice

from nvme_mdev.guest_memory import DmaError
from nvme_mdev.vfio_user import protocol as p
from nvme_mdev.vfio_user import server as server_module
from nvme_mdev.vfio_user.client import ClientError, GuestRam, VfioUserClient
from nvme_mdev.vfio_user.device import IrqAction, RegionIndex
from nvme_mdev.vfio_user.framing import Message, MessageReader, send_message
from nvme_mdev.vfio_user.server import DMA_ABORT_GRACE, SocketInUse, VfioUserServer

PAGE = 4096
BAR0, BAR4, CONFIG = RegionIndex.BAR0, RegionIndex.BAR4, RegionIndex.CONFIG


class Raw:
    """A bare socket client: sends exactly the bytes it is given."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(5)
        self.sock.connect(path)
        self.reader = MessageReader(self.sock)

    def send(self, data: bytes, fds: list[int] | None = None) -> None:
        send_message(self.sock, data, fds or ())

    def recv(self) -> Message:
        return self.reader.receive()

    def call(
        self, msg_id: int, command: int, payload: bytes = b"", fds: list[int] | None = None
    ) -> Message:
        self.send(p.encode_message(msg_id, command, payload), fds)
        reply = self.recv()
        assert reply.header.is_reply and reply.header.msg_id == msg_id
        return reply

    def quiet(self, wait: float = 0.2) -> bool:
        """Nothing more arrives for a while."""
        if self.reader.buffered():
            return False
        return not select.select([self.sock], [], [], wait)[0]

    def negotiate(self) -> Message:
        reply = self.call(0, p.Command.VERSION, QEMU_VERSION)
        assert not reply.header.is_error
        return reply

    def close(self) -> None:
        self.reader.close()
        self.sock.close()


@pytest.fixture
def raw(server: VfioUserServer) -> Iterator[Raw]:
    r = Raw(server.socket_path)
    yield r
    r.close()


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def wait_for(predicate: object, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


# --- the socket --------------------------------------------------------------------------


def test_socket_file_is_owner_only_and_goes_with_stop(sock_dir: Path, device: FakeDevice) -> None:
    path = sock_dir / "s"
    server = VfioUserServer(str(path), device)
    mode = os.stat(path).st_mode
    assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600
    server.start()
    server.stop()
    assert not path.exists()


def test_socket_path_rules(sock_dir: Path, server: VfioUserServer, device: FakeDevice) -> None:
    with pytest.raises(SocketInUse, match="in use"):
        VfioUserServer(server.socket_path, device)
    plain = sock_dir / "plain"
    plain.write_text("x")
    with pytest.raises(SocketInUse, match="not a socket"):
        VfioUserServer(str(plain), device)
    stale = sock_dir / "stale"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(stale))
    s.close()  # a socket file nobody listens on
    again = VfioUserServer(str(stale), device)
    again.start()
    with VfioUserClient(str(stale), timeout=5) as c:
        c.negotiate()
    again.stop()
    assert not stale.exists()
    assert os.path.exists(server.socket_path)  # the live one untouched


# --- VERSION and information ---------------------------------------------------------------


def test_version_negotiation_as_qemu_does_it(raw: Raw) -> None:
    reply = raw.negotiate()
    assert reply.header.size <= 16 + len(QEMU_VERSION)  # QEMU's reply buffer
    assert reply.payload[:4] == b"\0\0\0\0" and reply.payload.endswith(b"\0")
    caps = json.loads(reply.payload[4:-1])["capabilities"]
    assert caps == {
        "max_msg_fds": 16,
        "max_data_xfer_size": 1 << 20,
        "pgsizes": 4096,
        "max_dma_maps": p.SERVER_MAX_DMA_MAPS,
        "write_multiple": True,
    }
    again = raw.call(1, p.Command.VERSION, QEMU_VERSION)
    assert again.header.is_error and again.header.error == errno.EINVAL


def test_commands_before_version_are_refused(raw: Raw) -> None:
    reply = raw.call(5, p.Command.DEVICE_GET_INFO, p.DeviceInfo().encode())
    assert reply.header.is_error and reply.header.error == errno.EINVAL
    bad = raw.call(6, p.Command.VERSION, struct.pack("<HH", 1, 0) + b"{}\0")
    assert bad.header.error == errno.ENOTSUP
    raw.negotiate()


def test_device_info(client: VfioUserClient) -> None:
    flags, regions, irqs = client.device_info()
    assert flags == p.DEVICE_FLAGS_PCI | p.DEVICE_FLAGS_RESET
    assert (regions, irqs) == (9, 5)  # QEMU wants >= 9 regions and >= 3 IRQ indexes


def test_region_info_sparse_mmap_and_fd(client: VfioUserClient, device: FakeDevice) -> None:
    device.shared[0x1000:0x1004] = b"ring"
    info = client.region_info(BAR0)  # asks with 32, then with what it is told
    assert info.size == BAR0_SIZE and info.sparse_areas == ((0x1000, 0x1000),)
    rw = p.REGION_INFO_FLAG_READ | p.REGION_INFO_FLAG_WRITE
    assert info.flags == rw | p.REGION_INFO_FLAG_MMAP | p.REGION_INFO_FLAG_CAPS
    assert info.fd is not None and info.offset == 0
    try:
        m = __import__("mmap").mmap(info.fd, 0x1000, offset=0x1000)
        assert m[:4] == b"ring"
        m[4:8] = b"bell"
        assert device.shared[0x1004:0x1008] == b"bell"
        m.close()
    finally:
        os.close(info.fd)
    short = client.region_info(BAR0, argsz=32)  # QEMU's first question
    assert short.argsz == 64 and short.sparse_areas == () and short.fd is None
    assert not short.flags & p.REGION_INFO_FLAG_CAPS
    config = client.region_info(CONFIG)
    assert (config.size, config.flags, config.fd) == (4096, rw, None)
    empty = client.region_info(RegionIndex.BAR1)
    assert (empty.size, empty.flags) == (0, 0)
    with pytest.raises(ClientError) as failure:
        client.region_info(9)
    assert failure.value.errno == errno.EINVAL


def test_irq_info(client: VfioUserClient) -> None:
    intx = client.irq_info(0)
    assert intx.count == 1
    assert intx.flags == p.IRQ_INFO_EVENTFD | p.IRQ_INFO_MASKABLE | p.IRQ_INFO_AUTOMASKED
    assert tuple(client.irq_info(2)) == (p.IRQ_INFO_EVENTFD | p.IRQ_INFO_NORESIZE, MSIX_VECTORS)
    assert tuple(client.irq_info(1)) == (0, 0)
    with pytest.raises(ClientError):
        client.irq_info(5)


def test_irq_info_flags_from_the_device(sock_dir: Path) -> None:
    dev = FakeDevice(irq_info_flags=(7, 0, 3, 0, 0))
    with VfioUserServer(str(sock_dir / "f"), dev) as server:
        server.start()
        with VfioUserClient(server.socket_path, timeout=5) as c:
            c.negotiate()
            assert c.irq_info(0).flags == 7 and c.irq_info(2).flags == 3
    dev.close()


# --- interrupts ---------------------------------------------------------------------------


def test_msix_eventfds_reach_the_device_in_chunks(
    client: VfioUserClient, device: FakeDevice
) -> None:
    fds = client.enable_msix(MSIX_VECTORS)  # 20 vectors: 16 + 4 (max_msg_fds)
    try:
        chunks = [(r.start, r.count, len(r.fds or ())) for r in device.irq_requests]
        assert chunks == [(0, 16, 16), (16, 4, 4)]
        assert all(r.action == IrqAction.TRIGGER for r in device.irq_requests)
        for vector in (0, 15, 16, 19):
            device.signal(2, vector)  # the device's fd is the client's eventfd
            assert os.eventfd_read(fds[vector]) == 1
        # A run of "no eventfd" vectors comes with no fds at all: -1 for each.
        client.set_irqs(2, p.IRQ_SET_ACTION_TRIGGER, 3, 2, fds=[-1, -1])
        assert device.irq_requests[-1].fds == [-1, -1] and (2, 3) not in device.fds
        client.set_irqs(2, p.IRQ_SET_ACTION_MASK, 0, 3, bools=[True, False, True])
        mask = device.irq_requests[-1]
        assert (mask.action, mask.flags, mask.fds) == (IrqAction.MASK, (True, False, True), None)
        client.set_irqs(0, p.IRQ_SET_ACTION_UNMASK, 0, 1)  # INTx EOI, DATA_NONE
        unmask = device.irq_requests[-1]
        assert (unmask.index, unmask.action, unmask.count, unmask.flags) == (
            0,
            IrqAction.UNMASK,
            1,
            None,
        )
        client.disable_irqs(2)  # count 0, DATA_NONE | TRIGGER
        off = device.irq_requests[-1]
        assert (off.index, off.count, off.fds, off.flags) == (2, 0, None, None)
        assert not any(k[0] == 2 for k in device.fds)
    finally:
        for fd in fds:
            os.close(fd)


def test_set_irqs_refused_and_fds_closed(client: VfioUserClient, device: FakeDevice) -> None:
    before = open_fds()
    efds = [os.eventfd(0) for _ in range(5)]
    with pytest.raises(ClientError) as failure:
        client.set_irqs(2, p.IRQ_SET_ACTION_TRIGGER, 18, 5, fds=efds)  # past vector 20
    assert failure.value.errno == errno.EINVAL
    with pytest.raises(ClientError):
        client.set_irqs(4, p.IRQ_SET_ACTION_TRIGGER, 0, 1, fds=efds[:1])  # no such index
    for fd in efds:
        os.close(fd)
    assert open_fds() == before  # the server closed the copies it was sent
    assert not device.irq_requests


# --- region access ---------------------------------------------------------------------------


def test_region_read_write(client: VfioUserClient, device: FakeDevice) -> None:
    client.write32(BAR0, 0x14, 0x460001)
    assert device.bars[BAR0][0x14:0x18] == (0x460001).to_bytes(4, "little")
    assert client.read32(BAR0, 0x14) == 0x460001
    assert client.region_read(CONFIG, 0, 4) == b"\x36\x1b\x10\x00"
    config = client.region_read(CONFIG, 0, 4096)  # QEMU reads it whole at start-up
    assert len(config) == 4096
    with pytest.raises(ClientError) as failure:
        client.region_read(BAR0, BAR0_SIZE - 2, 4)
    assert failure.value.errno == errno.EINVAL


def test_posted_write_gets_no_reply(raw: Raw, device: FakeDevice) -> None:
    raw.negotiate()
    payload = p.RegionAccess(BAR0, 0x1008, 4, b"\7\0\0\0").encode()
    raw.send(p.encode_message(40, p.Command.REGION_WRITE, payload, no_reply=True))
    reply = raw.call(41, p.Command.REGION_READ, p.RegionAccess(BAR0, 0x1008, 4).encode())
    assert reply.payload[16:] == b"\7\0\0\0"  # ordered after the posted write
    assert raw.quiet()  # and the posted write was never answered
    # A posted write that fails is not answered either.
    bad = p.RegionAccess(BAR0, BAR0_SIZE, 4, bytes(4)).encode()
    raw.send(p.encode_message(42, p.Command.REGION_WRITE, bad, no_reply=True))
    assert raw.call(43, p.Command.DEVICE_RESET).header.msg_id == 43
    assert raw.quiet()


def test_posted_writes_with_the_client(client: VfioUserClient, device: FakeDevice) -> None:
    for i in range(100):
        client.write32(BAR0, 0x1000 + 8 * (i % 8), i, posted=True)
    assert client.read32(BAR0, 0x1000 + 8 * (99 % 8)) == 99
    assert len(device.writes) == 100


def test_write_multi(raw: Raw, device: FakeDevice) -> None:
    raw.negotiate()
    multi = p.WriteMulti(
        (p.RegionAccess(BAR0, 0x28, 4, b"\0\x50\x34\x12"), p.RegionAccess(BAR4, 8, 8, b"ABCDEFGH"))
    ).encode()
    reply = raw.call(50, p.Command.REGION_WRITE_MULTI, multi)
    assert reply.payload == struct.pack("<Q", 2)
    assert (
        device.bars[BAR0][0x28:0x2C] == b"\0\x50\x34\x12" and device.bars[BAR4][8:16] == b"ABCDEFGH"
    )
    raw.send(p.encode_message(51, p.Command.REGION_WRITE_MULTI, multi, no_reply=True))
    assert raw.call(52, p.Command.DEVICE_RESET).header.msg_id == 52 and raw.quiet()
    assert len(device.writes) == 4


def test_write_multi_with_the_client(client: VfioUserClient, device: FakeDevice) -> None:
    client.write_multi([(BAR0, 0x1000, b"\1\0\0\0"), (BAR0, 0x1008, b"\2\0\0\0")])
    assert client.read32(BAR0, 0x1008) == 2 and client.read32(BAR0, 0x1000) == 1


# --- guest memory ---------------------------------------------------------------------------


def test_dma_map_memfd(server: VfioUserServer, client: VfioUserClient, device: FakeDevice) -> None:
    ram = GuestRam(16 * PAGE, base=0x100000)
    try:
        client.dma_map(ram)
        ram.write(0x100010, b"guest bytes")
        assert server.memory.read(0x100010, 11) == b"guest bytes"
        view = server.memory.view(0x100000, PAGE, True)
        assert view is not None
        view[0:4] = b"dev!"
        view.release()
        assert ram.read(0x100000, 4) == b"dev!"
        server.memory.write(0x100000 + 5 * PAGE, b"written")
        assert ram.read(0x100000 + 5 * PAGE, 7) == b"written"
        # A second window onto the same memfd at an offset (QEMU maps RAM above
        # 4 GiB this way).
        client.dma_map_fd(0x200000, 4 * PAGE, ram.fd, 8 * PAGE)
        assert server.memory.read(0x200000, 4) == ram.read(0x100000 + 8 * PAGE, 4)
        with pytest.raises(ClientError) as failure:
            client.dma_map_fd(0x100000 + PAGE, PAGE, ram.fd, 0)  # overlaps
        assert failure.value.errno == errno.EEXIST
        with pytest.raises(ClientError):
            client.dma_map_fd(0x300000, 32 * PAGE, ram.fd, 0)  # past the end of the memfd
    finally:
        ram.close()


def test_message_dma_is_chunked_and_thread_safe(server: VfioUserServer, device: FakeDevice) -> None:
    with VfioUserClient(server.socket_path, timeout=5) as c:
        c.negotiate(max_data_xfer_size=4096)  # the server must chunk by the client's limit
        buf = c.add_message_region(0x800000, 64 * 1024)
        buf[100:10100] = bytes(range(100)) * 100
        results: list[bytes] = []
        errors: list[BaseException] = []

        def worker(i: int) -> None:
            try:
                results.append(server.memory.read(0x800000 + 100, 10000))
                server.memory.write(0x800000 + 20000 + i * 12000, bytes([i]) * 10000)
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        assert not errors and results == [bytes(range(100)) * 100] * 3
        for i in range(3):
            assert buf[20000 + i * 12000 : 30000 + i * 12000] == bytes([i]) * 10000
        assert c.dma_reads == 9 and c.dma_writes == 9  # 10000 bytes: 3 messages each
        assert server.memory.view(0x800000, 16, False) is None  # no fd: no view


def test_message_dma_from_a_device_call(
    server: VfioUserServer, client: VfioUserClient, device: FakeDevice
) -> None:
    """A device that does DMA inside a region write (on the server thread): the
    server thread must still read the reply it is waiting for."""
    buf = client.add_message_region(0x10000, PAGE)
    buf[0:8] = b"command!"
    seen: list[bytes] = []

    def doorbell(index: int, offset: int, data: bytes) -> None:
        if offset == 0x1000:
            seen.append(server.memory.read(0x10000, 8))
            server.memory.write(0x10008, b"done")

    device.on_write = doorbell
    client.write32(BAR0, 0x1000, 1, posted=True)
    client.write32(BAR0, 0x1000, 2)
    assert seen == [b"command!", b"command!"] and buf[8:12] == b"done"


def test_message_dma_abandoned_while_the_client_waits_for_us(
    raw: Raw, server: VfioUserServer, device: FakeDevice
) -> None:
    """QEMU cannot answer our DMA while it waits for a reply from us: the DMA fails
    after a grace period instead of both sides timing out."""
    raw.negotiate()
    assert not raw.call(
        1, p.Command.DMA_MAP, p.DmaMap(3, 0, 0x10000, PAGE).encode()
    ).header.is_error
    outcome: list[str] = []

    def hook(index: int, offset: int, data: bytes) -> None:
        try:
            server.memory.read(0x10000, 4)
            outcome.append("read")
        except DmaError as exc:
            outcome.append(str(exc))

    device.on_write = hook
    start = time.monotonic()
    raw.send(
        p.encode_message(2, p.Command.REGION_WRITE, p.RegionAccess(BAR0, 0, 4, bytes(4)).encode())
    )
    request = raw.recv()  # our DMA_READ, which this client (like a blocked QEMU) ignores
    assert request.header.command == p.Command.DMA_READ and not request.header.is_reply
    reply = raw.recv()
    elapsed = time.monotonic() - start
    assert reply.header.msg_id == 2 and not reply.header.is_error
    # Abandoned after the grace (which counts from the message's arrival, after
    # `start`), not by the DMA reply's own timeout: the error says which. (How soon
    # after the grace depends on the machine's load: no upper bound on the time.)
    assert elapsed >= DMA_ABORT_GRACE
    assert len(outcome) == 1 and "waiting for our reply" in outcome[0]
    # Its late answer is dropped, and the connection stays in step.
    raw.send(
        p.encode_message(
            request.header.msg_id,
            p.Command.DMA_READ,
            p.DmaAccess(0x10000, 4, bytes(4)).encode(),
            reply=True,
        )
    )
    device.on_write = None
    assert not raw.call(3, p.Command.DEVICE_RESET).header.is_error


def test_dma_unmap(server: VfioUserServer, client: VfioUserClient, device: FakeDevice) -> None:
    ram = GuestRam(4 * PAGE, base=0x100000)
    try:
        client.dma_map(ram)
        client.add_message_region(0x800000, PAGE)
        quiesces = device.quiesces
        client.dma_unmap(0x100000, 4 * PAGE)
        assert device.quiesces == quiesces + 1  # mmap'd: the device let go of it first
        with pytest.raises(DmaError):
            server.memory.read(0x100000, 4)
        client.dma_unmap(0x800000, PAGE)
        assert device.quiesces == quiesces + 1  # message-based: nothing to wait for
        with pytest.raises(ClientError) as failure:
            client.dma_unmap(0x800000, PAGE)
        assert failure.value.errno == errno.ENOENT
        client.dma_map(ram)
        client.add_message_region(0x800000, PAGE)
        client.dma_unmap_all()
        assert server.memory.regions == ()
        with pytest.raises(ClientError) as failure:
            client.request(
                p.Command.DMA_UNMAP,
                p.DMA_UNMAP.pack(24, p.DMA_UNMAP_FLAG_GET_DIRTY_BITMAP, 0, PAGE),
            )
        assert failure.value.errno == errno.ENOTSUP
    finally:
        ram.close()


def test_pipelined_dma_maps_keep_their_fds(raw: Raw, server: VfioUserServer) -> None:
    """QEMU sends map/unmap without waiting (a memory transaction): every fd must go
    with its own message, in order."""
    raw.negotiate()
    rams = [GuestRam(PAGE, name=f"ram{i}") for i in range(6)]
    try:
        for i, ram in enumerate(rams):
            ram.write(0, f"ram {i}".encode())
        burst = b"".join(
            p.encode_message(10 + i, p.Command.DMA_MAP, p.DmaMap(3, 0, i * PAGE, PAGE).encode())
            for i in range(6)
        )
        # One write for all six headers would lose the fds' boundaries: send each
        # with its fd, back to back, then read the replies.
        for i, ram in enumerate(rams):
            raw.send(burst[i * 48 : (i + 1) * 48], [ram.fd])
        unmap = p.encode_message(16, p.Command.DMA_UNMAP, p.DmaUnmap(0, 2 * PAGE, PAGE).encode())
        raw.send(unmap)
        replies = [raw.recv() for _ in range(7)]
        assert [r.header.msg_id for r in replies] == list(range(10, 17))
        assert not any(r.header.is_error for r in replies)
        for i in (0, 1, 3, 4, 5):
            assert server.memory.read(i * PAGE, 5) == f"ram {i}".encode()
        with pytest.raises(DmaError):
            server.memory.read(2 * PAGE, 1)
    finally:
        for ram in rams:
            ram.close()


def test_unmap_waits_for_a_device_thread_in_message_dma(
    server: VfioUserServer,
    client: VfioUserClient,
    device: FakeDevice,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The quiesce waits for the I/O thread, which waits for a DMA reply that only
    the (blocked) server thread would read: the waiting thread reads it itself.
    (With the grace after which such a DMA is abandoned made long, the reads succeed
    only that way, however slowly a loaded machine runs the threads.)"""
    monkeypatch.setattr(server_module, "DMA_ABORT_GRACE", 600.0)
    ram = GuestRam(PAGE, base=0x100000)
    buf = client.add_message_region(0x800000, PAGE)
    buf[0:8] = b"in guest"
    try:
        client.dma_map(ram)
        stop = threading.Event()
        failures: list[BaseException] = []
        reads = []

        def io_thread() -> None:
            while not stop.is_set():
                try:
                    with device.quiesce_lock:
                        time.sleep(0.01)  # busy with a command, then its DMA
                        reads.append(server.memory.read(0x800000, 8))
                except BaseException as exc:
                    failures.append(exc)
                    return
                time.sleep(0.001)

        worker = threading.Thread(target=io_thread)
        worker.start()
        wait_for(lambda: len(reads) > 2)
        client.dma_unmap(0x100000, PAGE)  # needs the quiesce
        stop.set()
        worker.join(60)
        assert not worker.is_alive()
        assert not failures and set(reads) == {b"in guest"}
    finally:
        ram.close()


def test_device_reset(client: VfioUserClient, device: FakeDevice) -> None:
    client.reset()
    assert device.resets == 1


# --- bad clients -----------------------------------------------------------------------------


def test_malformed_messages_get_error_replies(raw: Raw, device: FakeDevice) -> None:
    raw.negotiate()
    r, w = os.pipe()
    read_request = p.RegionAccess(BAR0, 0, 4).encode()
    cases: list[tuple[bytes, list[int] | None, int]] = [
        (p.encode_message(10, 99, b"whatever"), None, errno.ENOTSUP),  # unknown command
        (
            p.encode_message(11, p.Command.REGION_READ, read_request[:10]),
            None,
            errno.EINVAL,
        ),  # truncated
        (
            p.encode_message(12, p.Command.REGION_WRITE, p.REGION_RW.pack(0, 0, 8) + b"1234"),
            None,
            errno.EINVAL,
        ),
        (p.encode_message(13, p.Command.DMA_MAP, os.urandom(32)), None, errno.EINVAL),  # garbage
        (
            p.HEADER.pack(14, p.Command.REGION_READ, 32, 0x3, 0) + read_request,
            None,
            errno.EINVAL,
        ),  # type 3
        (
            p.HEADER.pack(15, p.Command.REGION_READ, 32, p.FLAG_ERROR, 0) + read_request,
            None,
            errno.EINVAL,
        ),
        (p.encode_message(16, p.Command.REGION_READ, read_request), [r], errno.EINVAL),  # stray fd
        (
            p.encode_message(17, p.Command.REGION_READ, p.RegionAccess(50, 0, 4).encode()),
            None,
            errno.EINVAL,
        ),
        (p.encode_message(18, p.Command.DMA_READ, p.DmaAccess(0, 4).encode()), None, errno.ENOTSUP),
        (p.encode_message(19, p.Command.DEVICE_RESET, b"x"), None, errno.EINVAL),
        (
            p.encode_message(20, p.Command.REGION_READ, p.REGION_RW.pack(0, 0, 1 << 21)),
            None,
            errno.E2BIG,
        ),
    ]
    before = open_fds()
    for data, fds, err in cases:
        raw.send(data, fds)
        reply = raw.recv()
        msg_id = struct.unpack_from("<H", data)[0]
        assert reply.header.msg_id == msg_id and reply.header.is_error, msg_id
        assert reply.header.error == err and reply.header.size == 16, msg_id
    os.close(r)
    os.close(w)
    assert open_fds() == before - 2  # the server kept no copy of the stray fd
    assert not device.writes and device.resets == 0
    # A malformed posted message: no reply, and serving goes on.
    raw.send(p.encode_message(30, 99, b"", no_reply=True))
    assert raw.call(31, p.Command.REGION_READ, read_request).payload[12:16] == struct.pack("<I", 4)
    assert raw.quiet()


def test_broken_framing_drops_the_client(server: VfioUserServer, device: FakeDevice) -> None:
    for header in (p.HEADER.pack(1, 1, 4, 0, 0), p.HEADER.pack(1, 1, 0xFFFFFFF0, 0, 0)):
        bad = Raw(server.socket_path)
        bad.negotiate()
        bad.send(header)
        with pytest.raises(ConnectionError):
            bad.recv()  # dropped
        bad.close()
    wait_for(lambda: device.resets == 2)
    with VfioUserClient(server.socket_path, timeout=5) as c:
        c.negotiate()
        assert c.read32(CONFIG, 0) == 0x00101B36


def test_disconnect_resets_the_device_and_the_next_client_is_served(
    server: VfioUserServer, device: FakeDevice
) -> None:
    ram = GuestRam(4 * PAGE)
    try:
        first = VfioUserClient(server.socket_path, timeout=5)
        first.negotiate()
        first.dma_map(ram)
        first.add_message_region(0x800000, PAGE)
        fds = first.enable_msix(4)
        assert len(server.memory.regions) == 2
        first.close()
        assert device.reset_event.wait(5)
        wait_for(lambda: not server.connected)
        assert not server.memory.has_message_regions and not device.fds
        assert len(server.memory.regions) == 0
        with pytest.raises(DmaError):
            server.memory.read(0x800000, 4)  # no client to ask
        for fd in fds:
            os.close(fd)
        with VfioUserClient(server.socket_path, timeout=5) as second:
            second.negotiate()
            second.dma_map(ram)
            ram.write(0, b"again")
            assert server.memory.read(0, 5) == b"again"
    finally:
        ram.close()


def test_one_client_at_a_time(server: VfioUserServer) -> None:
    first = Raw(server.socket_path)
    first.negotiate()
    second = Raw(server.socket_path)  # waits its turn
    second.send(p.encode_message(0, p.Command.VERSION, QEMU_VERSION))
    assert second.quiet(0.3)
    third = Raw(server.socket_path)  # one too many: closed at once
    with pytest.raises(ConnectionError):
        third.recv()
    third.close()
    first.close()
    reply = second.recv()
    assert reply.header.is_reply and not reply.header.is_error
    second.close()


def test_stop_disconnects_the_client(sock_dir: Path, device: FakeDevice) -> None:
    server = VfioUserServer(str(sock_dir / "t"), device)
    server.start()
    c = VfioUserClient(server.socket_path, timeout=5)
    c.negotiate()
    server.stop()
    assert device.resets == 1 and not os.path.exists(server.socket_path)
    with pytest.raises((ClientError, OSError)):
        c.read32(CONFIG, 0)
    c.close()


def test_no_fd_leaks(server: VfioUserServer, device: FakeDevice) -> None:
    before = open_fds()
    for _ in range(3):
        ram = GuestRam(4 * PAGE)
        device.reset_event.clear()
        with VfioUserClient(server.socket_path, timeout=5) as c:
            c.negotiate()
            c.dma_map(ram)
            fds = c.enable_msix(MSIX_VECTORS)
            info = c.region_info(BAR0)
            assert info.fd is not None
            os.close(info.fd)
            c.dma_unmap(0, 4 * PAGE)
            c.dma_map(ram)
        assert device.reset_event.wait(5)
        wait_for(lambda: not server.connected)
        for fd in fds:
            os.close(fd)
        ram.close()
    assert open_fds() == before
