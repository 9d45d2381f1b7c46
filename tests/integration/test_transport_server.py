"""The vfio-user server against a misbehaving or unusual client: the guest is
untrusted, so every bad message gets an error reply and the device keeps serving."""

from __future__ import annotations

import errno
import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from nvme_mdev.config import NamespaceSpec
from nvme_mdev.guest_memory import DmaError
from nvme_mdev.vfio_user import protocol as p
from nvme_mdev.vfio_user.client import ClientError, GuestRam, VfioUserClient
from nvme_mdev.vfio_user.server import SocketInUse, VfioUserServer
from nvme_mdev.virtual_controller import VirtualController


@pytest.fixture
def device(tmp_path: Path) -> Iterator[VirtualController]:
    image = tmp_path / "d.img"
    with open(image, "wb") as f:
        f.truncate(4 << 20)
    vc = VirtualController(str(tmp_path / "s.sock"), [NamespaceSpec.parse(str(image)).open(1)])
    vc.start()
    yield vc
    vc.stop()


@pytest.fixture
def client(device: VirtualController) -> Iterator[VfioUserClient]:
    c = VfioUserClient(device.server.socket_path, timeout=5)
    c.negotiate()
    yield c
    c.close()


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_device_info_regions_and_irqs(client: VfioUserClient) -> None:
    flags, regions, irqs = client.device_info()
    assert flags & p.DEVICE_FLAGS_PCI and flags & p.DEVICE_FLAGS_RESET
    assert (regions, irqs) == (9, 5)
    bar0 = client.region_info(0)
    assert bar0.size >= 16384 and bar0.flags & p.REGION_INFO_FLAG_READ
    assert client.region_info(7).size == 4096  # config space
    assert client.region_info(2).size == 0
    assert client.irq_info(2)[1] == 65  # MSI-X: one per queue pair + admin
    with pytest.raises(ClientError) as info:
        client.region_info(9)
    assert info.value.errno == errno.EINVAL


def test_config_space_identifies_an_nvme_controller(client: VfioUserClient) -> None:
    config = client.region_read(7, 0, 64)
    assert config[0:2] == b"\x4d\x4e" and config[9:12] == bytes([2, 8, 1])  # class 010802


def test_bad_messages_get_error_replies_and_serving_goes_on(client: VfioUserClient) -> None:
    cases = [
        (99, b"", errno.ENOTSUP),  # unknown command
        (p.Command.REGION_READ, b"\0" * 4, errno.EINVAL),  # truncated payload
        (p.Command.REGION_READ, p.REGION_RW.pack(1 << 20, 0, 4), errno.EINVAL),  # past BAR0
        (p.Command.REGION_WRITE, p.REGION_RW.pack(0, 0, 8) + b"1", errno.EINVAL),  # short data
        (p.Command.DEVICE_SET_IRQS, p.IRQ_SET.pack(20, 0xFF, 2, 0, 1), errno.EINVAL),
        (p.Command.DEVICE_SET_IRQS, p.IRQ_SET.pack(20, 0x24, 2, 60, 10), errno.EINVAL),
        (p.Command.DMA_UNMAP, p.DMA_UNMAP.pack(24, 0, 0x5000, 0x1000), errno.ENOENT),
        (p.Command.DMA_UNMAP, p.DMA_UNMAP.pack(24, 1, 0, 0x1000), errno.ENOTSUP),
        (p.Command.VERSION, p.VERSION.pack(0, 0) + b"{nope", errno.EINVAL),
    ]
    for command, payload, expected in cases:
        with pytest.raises(ClientError) as info:
            client.request(command, payload)
        assert info.value.errno == expected, (command, payload)
    assert client.read32(0, 0x08) == 0x20000  # VS: still serving


def test_posted_writes_and_write_multi(client: VfioUserClient) -> None:
    client.write32(0, 0x24, 0x001F001F, posted=True)  # AQA, no reply
    assert client.read32(0, 0x24) == 0x001F001F
    multi = p.WRITE_MULTI_COUNT.pack(2) + b"".join(
        p.WRITE_ONE.pack(off, 0, 4, val.to_bytes(4, "little") + bytes(4))
        for off, val in ((0x28, 0x12345000), (0x30, 0x6789A000))
    )
    client.request(p.Command.REGION_WRITE_MULTI, multi, no_reply=True)
    assert client.read32(0, 0x28) == 0x12345000 and client.read32(0, 0x30) == 0x6789A000


def test_dma_map_unmap_and_message_dma(device: VirtualController, client: VfioUserClient) -> None:
    ram = GuestRam(1 << 20, base=0x100000)
    try:
        client.dma_map(ram)
        ram.write(0x100010, b"guest bytes")
        assert device.memory.read(0x100010, 11) == b"guest bytes"
        view = device.memory.view(0x100000, 4096, True)
        assert view is not None
        view[0:4] = b"dev!"
        view.release()
        assert ram.read(0x100000, 4) == b"dev!"
        # Memory without an fd: the device reaches it through DMA_READ/DMA_WRITE,
        # from a thread other than the connection's (as the I/O thread does).
        buf = client.add_message_region(0x800000, 8192)
        buf[100:105] = b"hello"
        out: list[bytes] = []
        worker = threading.Thread(
            target=lambda: (
                out.append(device.memory.read(0x800000 + 100, 5)),
                device.memory.write(0x800000 + 4090, b"across-a-page"),
            )
        )
        worker.start()
        worker.join(10)
        assert out == [b"hello"] and bytes(buf[4090:4103]) == b"across-a-page"
        client.dma_unmap(0x100000, 1 << 20)
        with pytest.raises(DmaError):
            device.memory.read(0x100010, 4)
        with pytest.raises(ClientError):  # overlapping map
            client.add_message_region(0x800000, 4096)
    finally:
        ram.close()


def test_msix_eventfds_reach_the_device(device: VirtualController, client: VfioUserClient) -> None:
    fds = client.enable_msix(3)
    try:
        assert device.function.msix_enabled()
        device.function.signal(2)
        assert os.eventfd_read(fds[2]) == 1
        # Disable: count 0, DATA_NONE | ACTION_TRIGGER.
        client.set_irqs(2, p.IRQ_SET_DATA_NONE | p.IRQ_SET_ACTION_TRIGGER, 0, 0)
        assert not device.function.msix_enabled()
    finally:
        for fd in fds:
            os.close(fd)


def test_unusable_framing_drops_the_client_and_fds_do_not_leak(
    device: VirtualController,
) -> None:
    before = open_fds()
    for _ in range(5):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(device.server.socket_path)
        r, w = os.pipe()
        # A DMA_MAP carrying two fds (one too many) and then a header claiming 4 bytes.
        sock.sendmsg(
            [p.encode(1, p.Command.DMA_MAP, p.DMA_MAP.pack(32, 3, 0, 0, 4096))],
            [(socket.SOL_SOCKET, socket.SCM_RIGHTS, bytes(memoryview(bytearray(
                int.to_bytes(r, 4, "little") + int.to_bytes(w, 4, "little")))))],
        )  # fmt: skip
        os.close(r)
        os.close(w)
        reply = sock.recv(4096)
        assert p.Header.decode(reply).error == errno.EINVAL
        sock.sendall(p.HEADER.pack(2, 1, 4, 0, 0))
        assert sock.recv(16) == b""  # dropped
        sock.close()
    with VfioUserClient(device.server.socket_path) as again:
        again.negotiate()
        assert again.read32(0, 0x08) == 0x20000
    assert open_fds() <= before + 2


def test_socket_path_rules(tmp_path: Path, device: VirtualController) -> None:
    with pytest.raises(SocketInUse, match="in use"):
        VfioUserServer(device.server.socket_path, device.function, device.memory)
    plain = tmp_path / "plain"
    plain.write_text("x")
    with pytest.raises(SocketInUse, match="not a socket"):
        VfioUserServer(str(plain), device.function, device.memory)
    stale = tmp_path / "stale.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(stale))
    s.close()  # a socket file nobody listens on
    server = VfioUserServer(str(stale), device.function, device.memory)
    server.start()
    server.stop()
    assert not stale.exists()
