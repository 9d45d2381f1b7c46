"""Sharing host block devices safely (loop devices; root only): one exclusive claim
per disk shared by every window of it, overlap refused, a device the host uses
(mounted, held by another program, a file behind a loop device) refused unless
forced, and partitions compared with windows of their disk."""

from __future__ import annotations

import errno
import os
import shutil
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_daemon import MIB, DaemonProcess, image, write_read

from nvme_mdev.nvme_host import NvmeHost

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("losetup") is None, reason="loop devices need root"
)


def losetup(*args: str) -> str:
    return subprocess.run(
        ["losetup", *args], capture_output=True, text=True, check=True
    ).stdout.strip()


@pytest.fixture
def backing(tmp_path: Path) -> Path:
    return image(tmp_path, "backing.img")


@pytest.fixture
def loop(backing: Path) -> Iterator[str]:
    dev = losetup("-f", "--show", str(backing))
    yield dev
    subprocess.run(["losetup", "-d", dev], check=False)


@pytest.fixture
def daemon(tmp_path: Path, loop: str) -> Iterator[DaemonProcess]:
    # After `loop`, so that it stops (and lets go of the device) before the detach.
    d = DaemonProcess(tmp_path)
    yield d
    d.stop()


def exclusive_open(dev: str) -> int:
    """What another program does to use a device alone (mount, mkfs, a VM)."""
    return os.open(dev, os.O_RDONLY | os.O_EXCL)


def test_two_controllers_share_a_disk_through_windows(
    daemon: DaemonProcess, loop: str, backing: Path, tmp_path: Path
) -> None:
    daemon.ok("controller", "create", "vm1", "--socket", str(tmp_path / "vm1.sock"),
              "--ns", f"{loop},size=32M")  # fmt: skip
    vm2 = daemon.ok("controller", "create", "vm2", "--socket", str(tmp_path / "vm2.sock"),
                    "--ns", f"{loop},offset=32M")  # fmt: skip
    name = Path(loop).name
    assert vm2["namespaces"][0]["extent"] == {
        "store": f"/dev/{name}", "start": 32 * MIB, "end": 64 * MIB,
    }  # fmt: skip
    # The daemon holds the disk: nobody else can have it.
    with pytest.raises(OSError) as busy:
        exclusive_open(loop)
    assert busy.value.errno == errno.EBUSY
    message = daemon.refused("ns", "add", "vm2", f"{loop},offset=30M,size=4M")
    assert "controller vm1 nsid 1" in message and "controller vm2" not in message
    with NvmeHost(str(tmp_path / "vm1.sock")) as h1, NvmeHost(str(tmp_path / "vm2.sock")) as h2:
        h1.enable()
        h2.enable()
        write_read(h1, 1, 8, b"\x01" * 4096)
        write_read(h2, 1, 8, b"\x02" * 4096)
    daemon.ok("controller", "delete", "vm1")
    daemon.ok("controller", "delete", "vm2")
    data = backing.read_bytes()
    assert data[4096 : 2 * 4096] == b"\x01" * 4096
    assert data[32 * MIB + 4096 : 32 * MIB + 2 * 4096] == b"\x02" * 4096
    os.close(exclusive_open(loop))  # released with the last namespace on it


def test_a_device_held_by_another_program_needs_force(
    daemon: DaemonProcess, loop: str, tmp_path: Path
) -> None:
    daemon.ok("controller", "create", "vm", "--socket", str(tmp_path / "vm.sock"))
    fd = exclusive_open(loop)
    try:
        message = daemon.refused("ns", "add", "vm", loop)
        assert f"{loop}: busy: another program holds it" in message and "force" in message
        forced = daemon.ok("ns", "add", "vm", loop, "--force")
        assert forced["spec"] == f"{loop},force"
    finally:
        os.close(fd)


def test_the_file_behind_a_loop_device_is_busy(
    daemon: DaemonProcess, loop: str, backing: Path, tmp_path: Path
) -> None:
    daemon.ok("controller", "create", "vm", "--socket", str(tmp_path / "vm.sock"))
    message = daemon.refused("ns", "add", "vm", str(backing))
    assert f"loop device {loop} is backed by it" in message


def test_a_mounted_device_needs_force(daemon: DaemonProcess, loop: str, tmp_path: Path) -> None:
    mkfs = shutil.which("mkfs.ext4")
    if mkfs is None:
        pytest.skip("no mkfs.ext4")
    subprocess.run([mkfs, "-q", loop], check=True)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if subprocess.run(["mount", loop, str(mnt)], capture_output=True).returncode != 0:
        pytest.skip("cannot mount here")
    try:
        daemon.ok("controller", "create", "vm", "--socket", str(tmp_path / "vm.sock"))
        message = daemon.refused("ns", "add", "vm", loop)
        assert f"in use by the host: mounted at {mnt}" in message and "force" in message
        window = daemon.refused("ns", "add", "vm", f"{loop},offset=1M,size=1M")
        assert f"mounted at {mnt}" in window
        assert daemon.ok("ns", "add", "vm", f"{loop},ro,force")["readonly"] is True
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def mbr(path: Path, partitions: list[tuple[int, int]]) -> None:
    """A DOS partition table: (start, sectors) of each partition, type 83h."""
    table = bytearray(512)
    for i, (start, count) in enumerate(partitions):
        struct.pack_into("<B3sB3sII", table, 0x1BE + 16 * i, 0, b"", 0x83, b"", start, count)
    table[510:512] = b"\x55\xaa"
    with open(path, "r+b") as f:
        f.write(table)


def test_partitions_and_windows_of_their_disk(tmp_path: Path) -> None:
    backing = image(tmp_path, "parted.img")
    # p1: 1 MiB..17 MiB, p2: 17 MiB..33 MiB
    mbr(backing, [(2048, 32768), (34816, 32768)])
    dev = losetup("-f", "--show", "-P", str(backing))
    d: DaemonProcess | None = None
    try:
        name = Path(dev).name
        if not Path(f"/sys/class/block/{name}p2").exists() or not Path(f"{dev}p2").exists():
            pytest.skip("this kernel made no partitions (no DOS partition table support)")
        d = DaemonProcess(tmp_path)
        d.ok("controller", "create", "vm1", "--socket", str(tmp_path / "vm1.sock"),
             "--ns", f"{dev}p1")  # fmt: skip
        d.ok("controller", "create", "vm2", "--socket", str(tmp_path / "vm2.sock"),
             "--ns", f"{dev}p2")  # fmt: skip
        # A window of the whole disk over p1's last MiB: an overlap, found in disk bytes.
        message = d.refused("ns", "add", "vm2", f"{dev},offset=16M,size=2M,force")
        assert "controller vm1 nsid 1" in message and "1 MiB..17 MiB" in message
        # Clear of both partitions: the kernel gives nobody the whole disk while its
        # partitions are claimed, so it takes force.
        assert "already uses its partition" in d.refused("ns", "add", "vm2", f"{dev},offset=40M")
        assert d.ok("ns", "add", "vm2", f"{dev},offset=40M,force")["size"] == 24 * MIB
    finally:
        if d is not None:
            d.stop()
        subprocess.run(["losetup", "-d", dev], check=False)
