"""A block device as a namespace: a loop device over a file (root only)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from nvme_mdev.backends import uring
from nvme_mdev.backends.file import BackendError, FileBackend
from nvme_mdev.config import NamespaceSpec
from nvme_mdev.nvme_host import NvmeHost, read_write
from nvme_mdev.virtual_controller import VirtualController

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="loop devices need root")


@pytest.fixture
def loop(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    backing = tmp_path / "backing.img"
    with open(backing, "wb") as f:
        f.truncate(32 << 20)
    dev = subprocess.run(
        ["losetup", "-f", "--show", str(backing)], capture_output=True, text=True, check=True
    ).stdout.strip()
    yield dev, backing
    subprocess.run(["losetup", "-d", dev], check=False)


def test_block_device_backend(loop: tuple[str, Path]) -> None:
    dev, _ = loop
    backend = FileBackend(dev)
    try:
        assert backend.is_block_device
        assert backend.size == 32 << 20
        assert backend.block_size == 512
        # Opened exclusively: a second user of the device is refused, with the reason.
        with pytest.raises(BackendError, match=r"busy|in use"):
            FileBackend(dev)
    finally:
        backend.close()


def test_guest_io_reaches_the_device(tmp_path: Path, loop: tuple[str, Path]) -> None:
    dev, backing = loop
    ns = NamespaceSpec.parse(dev).open(1)
    vc = VirtualController(str(tmp_path / "s.sock"), [ns], poll_timeout=0.01)
    vc.start()
    try:
        with NvmeHost(str(tmp_path / "s.sock")) as host:
            host.enable()
            q = host.create_queue_pair(1)
            buf = host.alloc(8192)
            host.ram.write(buf, b"\x5a" * 8192)
            assert q.command(read_write(0x01, 1, buf, 2048, 16, prp2=buf + 4096)).ok
            assert q.command([0x00, 1]).ok  # Flush
            assert backing.read_bytes()[2048 * 512 : 2048 * 512 + 8192] == b"\x5a" * 8192
            # A block device is opened O_DIRECT too, and io_uring sent the aligned write there.
            target = ns.backend.io_target()
            assert target is not None and target.direct_fd >= 0 and target.direct_align == 512
            if uring.unavailable() is None:
                assert vc.engine.name == "uring"
                assert vc.statistics()["direct_transfers"] >= 1
            back = host.alloc(8192)
            assert q.command(read_write(0x02, 1, back, 2048, 16, prp2=back + 4096)).ok
            assert host.ram.read(back, 8192) == b"\x5a" * 8192
            # Write Zeroes on a block device: BLKZEROOUT.
            assert q.command([0x08, 1, 0, 0, 0, 0, 0, 0, 0, 0, 2048, 0, 7]).ok
            data = backing.read_bytes()[2048 * 512 : 2048 * 512 + 8192]
            assert data == bytes(4096) + b"\x5a" * 4096
            # Identify Namespace: no promise that deallocated blocks read zero (discard).
            ident = host.identify(0, nsid=1)
            assert ident[33] & 0x7 == 0
            assert int.from_bytes(ident[0:8], "little") == (32 << 20) // 512
    finally:
        vc.stop()
