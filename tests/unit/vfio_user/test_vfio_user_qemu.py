"""The wire format against the real client: QEMU (>= 10.1, vfio-user-pci) from the
private Debian tree tools/guest/prepare.sh builds, run under the qtest accelerator
(no guest, no kernel: a couple of seconds). Skipped where that tree is absent.

QEMU realizes the device against the fake one (VERSION, DEVICE_GET_INFO, region
and IRQ info, DMA_MAP of its RAM without fds), qtest turns on bus mastering, and
the server's DMA_READ/DMA_WRITE go through QEMU; qtest reads and writes guest RAM
directly to check what landed where.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from vfio_user_fakes import FakeDevice

from nvme_mdev.vfio_user.server import VfioUserServer

_CANDIDATES = [
    os.environ.get("NVME_MDEV_GUEST_DIR", ""),
    "/var/cache/nvme-mdev/guest",
    "/var/tmp/fresh-guest",
]


def _tree() -> Path | None:
    for candidate in _CANDIDATES:
        if candidate and (Path(candidate) / "usr/bin/qemu-system-x86_64").exists():
            return Path(candidate)
    return None


TREE = _tree()
pytestmark = pytest.mark.skipif(TREE is None, reason="no QEMU tree (tools/guest/prepare.sh)")
SLOT = 4  # 00:04.0
#: guest RAM QEMU can pass to the server as an fd
SHARED_RAM = "memory-backend-memfd,id=mem,size=64M,share=on"


class Qtest:
    def __init__(self, tree: Path, socket_path: str, shared: bool = False) -> None:
        libs = f"{tree}/usr/lib/x86_64-linux-gnu:{tree}/lib/x86_64-linux-gnu"
        device = '{"driver":"vfio-user-pci","socket":{"path":"%s","type":"unix"},"addr":"%d.0"}'
        self.proc = subprocess.Popen(
            [
                f"{tree}/lib64/ld-linux-x86-64.so.2",
                "--library-path",
                libs,
                f"{tree}/usr/bin/qemu-system-x86_64",
                "-L",
                f"{tree}/usr/share/qemu",
                "-L",
                f"{tree}/usr/share/seabios",
                "-accel",
                "qtest",
                "-qtest",
                "stdio",
                *(
                    ["-M", "q35,memory-backend=mem", "-object", SHARED_RAM]
                    if shared
                    else ["-M", "q35"]
                ),
                "-m",
                "64",
                "-display",
                "none",
                "-monitor",
                "none",
                "-serial",
                "none",
                "-nodefaults",
                "-device",
                device % (socket_path, SLOT),
            ],
            env=dict(os.environ, QEMU_MODULE_DIR=f"{tree}/usr/lib/x86_64-linux-gnu/qemu"),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            bufsize=1,
        )
        # qtest answers each command at once; a QEMU that stops answering is killed
        # so that readline() sees EOF instead of blocking the test run
        self._watchdog = threading.Timer(60, self.proc.kill)
        self._watchdog.daemon = True
        self._watchdog.start()

    def cmd(self, line: str) -> str:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        reply = self.proc.stdout.readline().strip()
        assert reply.startswith("OK"), (line, reply)
        return reply[2:].strip()

    def bus_master(self) -> None:
        self.cmd(f"outl 0xcf8 {0x80000004 | SLOT << 11:#x}")
        self.cmd("outw 0xcfc 0x6")  # memory space + bus master

    def read(self, addr: int, length: int) -> bytes:
        return bytes.fromhex(self.cmd(f"read {addr:#x} {length:#x}")[2:])

    def write(self, addr: int, data: bytes) -> None:
        self.cmd(f"write {addr:#x} {len(data):#x} 0x{data.hex()}")

    def close(self) -> str:
        self._watchdog.cancel()
        if self.proc.returncode is not None:
            return ""
        self.proc.terminate()
        try:
            _, err = self.proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
        return err


@pytest.fixture
def qemu(server: VfioUserServer) -> Iterator[Qtest]:
    yield from _qemu(server, shared=False)


@pytest.fixture
def qemu_shared(server: VfioUserServer) -> Iterator[Qtest]:
    yield from _qemu(server, shared=True)


def _qemu(server: VfioUserServer, shared: bool) -> Iterator[Qtest]:
    assert TREE is not None
    q = Qtest(TREE, server.socket_path, shared)
    try:
        deadline = time.monotonic() + 30
        while not any(r.iova <= 0x100000 < r.end for r in server.memory.regions):
            assert q.proc.poll() is None, q.close()
            assert time.monotonic() < deadline, "QEMU never mapped its RAM"
            time.sleep(0.05)
        q.bus_master()
        yield q
    finally:
        q.close()


def test_qemu_maps_its_ram_without_fds(qemu: Qtest, server: VfioUserServer) -> None:
    regions = server.memory.regions
    assert regions and not any(r.fd_backed for r in regions)  # no shared memory backend
    assert any(r.iova == 0x100000 and r.writable for r in regions)
    assert any(r.iova == 0xFFFC0000 and not r.writable for r in regions)  # the BIOS ROM


def test_message_dma_with_qemu(qemu: Qtest, server: VfioUserServer) -> None:
    memory = server.memory
    # SeaBIOS's reset vector: ljmp f000:e05b, then its build date
    assert memory.read(0xFFFFFFF0, 5) == bytes.fromhex("ea5be000f0")
    qemu.write(0x200000, bytes(range(64)))
    assert memory.read(0x200000 + 3, 40) == bytes(range(3, 43))
    pattern = bytes(range(1, 41))
    memory.write(0x300000, pattern)
    assert qemu.read(0x300000, 48) == pattern + bytes(8)  # exactly these bytes, here
    memory.write(0x300101, b"\xab")
    assert qemu.read(0x300100, 4) == b"\0\xab\0\0"
    big = os.urandom(3 << 20)  # several max_data_xfer_size chunks each way
    memory.write(0x400000, big)
    assert qemu.read(0x400000, 64) == big[:64]
    assert memory.read(0x400000, len(big)) == big


def test_bar0_access_with_qemu(qemu: Qtest, device: FakeDevice) -> None:
    """BAR0 programmed through config space: trapped registers go as REGION_WRITE/
    REGION_READ, the sparse-mmap doorbell page goes to the shared memfd, no message."""

    def config(offset: int, value: int, width: str = "l") -> None:
        qemu.cmd(f"outl 0xcf8 {0x80000000 | SLOT << 11 | offset:#x}")
        qemu.cmd(f"out{width} 0xcfc {value:#x}")

    config(0x10, 0xFE000000)  # BAR0
    config(0x04, 0x6, "w")  # memory space + bus master
    writes = len(device.writes)
    qemu.cmd("writel 0xfe000014 0x460001")
    assert device.writes[writes:] == [(0, 0x14, (0x460001).to_bytes(4, "little"))]
    assert int(qemu.cmd("readl 0xfe000014"), 16) == 0x460001
    device.bars[0][0x1C:0x20] = b"\x78\x56\x34\x12"
    assert int(qemu.cmd("readl 0xfe00001c"), 16) == 0x12345678
    qemu.cmd("writel 0xfe001008 0x7")  # the doorbell page
    assert device.shared[0x1008:0x100C] == b"\7\0\0\0"
    assert len(device.writes) == writes + 1


def test_concurrent_message_dma_with_qemu(qemu: Qtest, server: VfioUserServer) -> None:
    """Several device threads reading at once: QEMU's replies would add up past its
    socket buffer and arrive truncated if more than one DMA_READ were in flight."""
    size = 64 * 1024
    pattern = os.urandom(8 * size)
    server.memory.write(0x400000, pattern)
    errors: list[object] = []

    def worker(i: int) -> None:
        for _ in range(10):
            try:
                data = server.memory.read(0x400000 + i * size, size)
            except Exception as exc:  # reported below
                errors.append(exc)
                return
            if data != pattern[i * size : (i + 1) * size]:
                errors.append(f"thread {i}: wrong data")

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors
    assert server.memory.read(0x400000, 16) == pattern[:16]  # and still in step


def test_qemu_leaving_resets_the_device(
    qemu: Qtest, server: VfioUserServer, device: FakeDevice
) -> None:
    resets = device.resets  # QEMU resets the device as the machine starts, too
    assert server.connected
    qemu.close()
    deadline = time.monotonic() + 10
    while server.connected:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert device.resets == resets + 1 and server.memory.regions == ()


def test_shared_guest_ram_with_qemu(qemu_shared: Qtest, server: VfioUserServer) -> None:
    """With a memfd RAM backend QEMU maps RAM with fds (zero-copy views); its ROM
    stays message-based."""
    regions = server.memory.regions
    assert any(r.iova == 0x100000 and r.fd_backed for r in regions)
    assert any(r.iova == 0xFFFC0000 and not r.fd_backed for r in regions)
    qemu_shared.write(0x200000, b"hello from qemu")
    assert server.memory.read(0x200000, 15) == b"hello from qemu"
    view = server.memory.view(0x300000, 8, True)
    assert view is not None
    view[:] = b"devwrote"
    view.release()
    assert qemu_shared.read(0x300000, 8) == b"devwrote"
    assert server.memory.read(0xFFFFFFF0, 5) == bytes.fromhex("ea5be000f0")
