"""Host events with a running device and real storage: files and block devices that
grow and shrink (`nvme-mdev ns rescan`, seen by the project's NVMe host driver as the
guest: Identify Namespace and the Namespace Attribute Changed event), and storage that
really fails (a full tmpfs; a loop device whose capacity drops to zero, as a deleted
disk's does)."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_daemon import MIB, DaemonProcess, aer, changed_namespaces, event, image, write_read

from nvme_mdev.control import call
from nvme_mdev.nvme_host import NvmeHost, read_write

CLI = [sys.executable, "-m", "nvme_mdev.cli"]
NS_ATTRIBUTE_CHANGED = 0x2 | (0x04 << 16)
SMART_EVENT = 0x1 | (0x02 << 16)
CAPACITY_EXCEEDED_DNR = 0x4081
NAMESPACE_NOT_READY_DNR = 0x4082
ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not ROOT, reason="mounts and loop devices need root")


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[DaemonProcess]:
    d = DaemonProcess(tmp_path)
    yield d
    d.stop()


def nsze(host: NvmeHost, nsid: int) -> tuple[int, int, int]:
    """NSZE, NCAP, NUSE of Identify Namespace."""
    return struct.unpack_from("<QQQ", host.identify(0, nsid))


def smart(host: NvmeHost) -> bytes:
    buf = host.alloc(4096)
    c = host.admin_command([0x02, 0xFFFFFFFF, 0, 0, 0, 0, buf, 0, 0, 0, 0x02 | (127 << 16)])
    assert c.ok
    return host.ram.read(buf, 512)


def test_rescan_tells_the_guest_of_a_grown_and_a_shrunk_file(
    daemon: DaemonProcess, tmp_path: Path
) -> None:
    first, second = image(tmp_path, "a.img", 16 * MIB), image(tmp_path, "b.img", 16 * MIB)
    daemon.ok(
        "controller", "create", "vm", "--socket", str(tmp_path / "vm.sock"),
        "--ns", str(first), "--ns", f"{second},bs=4096",
    )  # fmt: skip
    with NvmeHost(str(tmp_path / "vm.sock")) as host:
        host.enable()
        assert nsze(host, 1) == (32768, 32768, 32768)
        aer(host)
        # Nothing changed: nothing to tell.
        result = daemon.ok("ns", "rescan")
        assert [(n["nsid"], n["changed"]) for n in result["namespaces"]] == [(1, False), (2, False)]
        os.truncate(first, 64 * MIB)
        os.truncate(second, 8 * MIB + 1000)  # not a whole number of 4 KiB blocks
        text = daemon.cli("ns", "rescan")
        assert text.returncode == 0, text.stderr
        assert "vm nsid 1: 16 MiB -> 64 MiB (32768 -> 131072 blocks), guest told" in text.stdout
        assert "vm nsid 2: 16 MiB -> " in text.stdout and "(4096 -> 2048 blocks)" in text.stdout
        done = event(host)
        assert (done.dw0, done.status) == (NS_ATTRIBUTE_CHANGED, 0)
        assert changed_namespaces(host) == [1, 2]
        assert nsze(host, 1) == (131072, 131072, 131072)
        assert nsze(host, 2) == (2048, 2048, 2048)
        # The new blocks take I/O, and the file holds what the guest wrote there.
        assert write_read(host, 1, 131071, b"\x7e" * 512) == b"\x7e" * 512
        assert first.read_bytes()[64 * MIB - 512 :] == b"\x7e" * 512
        buf = host.alloc(4096)
        assert host.io[1].command(read_write(0x02, 2, buf, 2048, 1)).status == 0x4080
        # One namespace at a time, JSON for machines.
        aer(host)
        os.truncate(second, 12 * MIB)
        one = daemon.ok("ns", "rescan", "vm", "2")["namespaces"]
        assert [(n["nsid"], n["blocks_before"], n["blocks"]) for n in one] == [(2, 2048, 3072)]
        assert event(host).dw0 == NS_ATTRIBUTE_CHANGED
        assert changed_namespaces(host) == [2]
    listing = daemon.ok("list")["controllers"][0]["namespaces"]
    assert [n["size"] for n in listing] == [64 * MIB, 12 * MIB]


def test_rescan_refusals_are_one_line(daemon: DaemonProcess, tmp_path: Path) -> None:
    shared = image(tmp_path, "shared.img", 32 * MIB)
    daemon.ok("controller", "create", "vm1", "--socket", str(tmp_path / "vm1.sock"),
              "--ns", f"{shared},offset=8M", "--ns", f"{shared},size=4M")  # fmt: skip
    os.truncate(shared, 64 * MIB)
    # The file grew: another controller takes bytes past vm1's window as it was.
    daemon.ok("controller", "create", "vm2", "--socket", str(tmp_path / "vm2.sock"),
              "--ns", f"{shared},offset=48M")  # fmt: skip
    message = daemon.refused("ns", "rescan", "vm1")
    assert message.startswith("nvme-mdev: error: controller vm1 nsid 1: growing to 56 MiB")
    assert "overlap controller vm2 nsid 1 (bytes 48 MiB..64 MiB); it keeps 24 MiB" in message
    reply = daemon.cli("ns", "rescan", "vm1", "--json")
    assert reply.returncode == 1
    results = json.loads(reply.stdout)["namespaces"]
    assert results[0]["error"] and results[0]["size"] == 24 * MIB
    assert results[1]["error"] is None and not results[1]["changed"]
    # Shrunk under a fixed window: it no longer fits; it keeps its size.
    daemon.ok("controller", "delete", "vm2")
    os.truncate(shared, 2 * MIB)
    message = daemon.refused("ns", "rescan", "vm1", "2")
    assert message == (
        f"nvme-mdev: error: controller vm1 nsid 2: {shared}: window 0+4194304 now reaches "
        "past the end (2097152 bytes)"
    )
    assert "no nsid 5 (has: 1, 2)" in daemon.refused("ns", "rescan", "vm1", "5")
    assert "no controller vm9" in daemon.refused("ns", "rescan", "vm9")


def test_rescan_on_serve_and_an_unlinked_file(tmp_path: Path) -> None:
    """`serve` answers the same method on SOCKET.ctl; an unlinked image keeps working
    and rescan says so."""
    disk = image(tmp_path, "disk.img", 8 * MIB)
    sock = tmp_path / "s.sock"
    proc = subprocess.Popen([*CLI, "serve", "--socket", str(sock), str(disk)], text=True)
    control = tmp_path / "s.sock.ctl"
    try:
        for _ in range(500):
            if control.exists() or proc.poll() is not None:
                break
            time.sleep(0.02)
        with NvmeHost(str(sock)) as host:
            host.enable()
            aer(host)
            os.truncate(disk, 10 * MIB)
            result = call(str(control), "namespace_rescan")["namespaces"]
            assert [(n["controller"], n["blocks"], n["changed"]) for n in result] == [
                ("nvme-mdev", 20480, True)
            ]
            assert event(host).dw0 == NS_ATTRIBUTE_CHANGED
            assert nsze(host, 1)[0] == 20480
            os.unlink(disk)
            text = subprocess.run(
                [*CLI, "ns", "rescan", "--control", str(control)],
                capture_output=True, text=True, timeout=30,
            )  # fmt: skip
            assert text.returncode == 0
            assert "was unlinked; the namespace still uses the open file" in text.stdout
            assert write_read(host, 1, 20479, b"\x11" * 512) == b"\x11" * 512
    finally:
        proc.terminate()
        assert proc.wait(30) == 0


@pytest.fixture
def tiny_tmpfs(tmp_path: Path) -> Iterator[Path]:
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


@needs_root
def test_a_full_filesystem_is_capacity_exceeded(
    daemon: DaemonProcess, tmp_path: Path, tiny_tmpfs: Path
) -> None:
    """A sparse 16 MiB image on a 1 MiB tmpfs: the guest fills what the filesystem has,
    then each write fails with Capacity Exceeded (DNR), never a hang; reads go on."""
    disk = image(tiny_tmpfs, "thin.img", 16 * MIB)
    daemon.ok("controller", "create", "vm", "--socket", str(tmp_path / "vm.sock"),
              "--ns", str(disk))  # fmt: skip
    with NvmeHost(str(tmp_path / "vm.sock")) as host:
        host.enable()
        q = host.create_queue_pair(1)
        buf = host.alloc(4096)
        host.ram.write(buf, b"\x33" * 4096)
        statuses = [q.command(read_write(0x01, 1, buf, i * 8, 8)).status for i in range(320)]
        assert statuses[0] == 0 and statuses[-1] == CAPACITY_EXCEEDED_DNR
        assert set(statuses) == {0, CAPACITY_EXCEEDED_DNR}
        assert q.command(read_write(0x02, 1, buf, 0, 8)).ok
        log = smart(host)
        assert int.from_bytes(log[160:176], "little") == 0  # not a media error
        assert int.from_bytes(log[176:192], "little") == statuses.count(CAPACITY_EXCEEDED_DNR)
    stats = daemon.ok("stats")
    assert stats["host_io_errors"] == statuses.count(CAPACITY_EXCEEDED_DNR)


@needs_root
@pytest.mark.skipif(shutil.which("losetup") is None, reason="no losetup")
def test_a_block_device_that_grows_then_goes(daemon: DaemonProcess, tmp_path: Path) -> None:
    """A loop device: grown (losetup -c), rescan sees BLKGETSIZE64; then its capacity
    drops to zero as a deleted disk's does: the namespace fails fast with Namespace Not
    Ready (DNR), SMART says reliability degraded, and the device keeps serving."""
    backing = image(tmp_path, "backing.img", 16 * MIB)
    loop = subprocess.run(
        ["losetup", "-f", "--show", str(backing)], capture_output=True, text=True, check=True
    ).stdout.strip()
    try:
        other = image(tmp_path, "other.img", 4 * MIB)
        daemon.ok("controller", "create", "vm", "--socket", str(tmp_path / "vm.sock"),
                  "--ns", loop, "--ns", str(other))  # fmt: skip
        with NvmeHost(str(tmp_path / "vm.sock")) as host:
            host.enable()
            assert nsze(host, 1)[0] == 32768
            os.truncate(backing, 32 * MIB)
            subprocess.run(["losetup", "-c", loop], check=True)
            aer(host)
            (result,) = daemon.ok("ns", "rescan", "vm", "1")["namespaces"]
            assert (result["size"], result["changed"]) == (32 * MIB, True)
            assert event(host).dw0 == NS_ATTRIBUTE_CHANGED
            assert changed_namespaces(host) == [1]
            assert nsze(host, 1)[0] == 65536
            assert write_read(host, 1, 65535, b"\x44" * 512) == b"\x44" * 512
            # SMART critical warnings on (Async Event Configuration bits 7:0), as a
            # driver that wants them does.
            aer(host)
            assert host.admin_command([0x09, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x0B, 0x1FF]).ok
            os.truncate(backing, 0)
            subprocess.run(["losetup", "-c", loop], check=True)
            q = host.io[1]
            buf = host.alloc(4096)
            # Each command completes (command() gives up on one that never does), with
            # the failure: nothing hangs on the shrunk device.
            assert q.command(read_write(0x02, 1, buf, 100, 8)).status == NAMESPACE_NOT_READY_DNR
            for opcode in (0x01, 0x02, 0x00):
                assert q.command(read_write(opcode, 1, buf, 0, 1)).status == (
                    NAMESPACE_NOT_READY_DNR
                )
            done = event(host)
            assert (done.dw0, done.status) == (SMART_EVENT, 0)
            assert smart(host)[0] == 1 << 2  # NVM subsystem reliability degraded
            # The other namespace is untouched.
            assert write_read(host, 2, 0, b"\x55" * 4096) == b"\x55" * 4096
        listing = daemon.cli("list")
        assert "nsid 1" in listing.stdout and "FAILED: " in listing.stdout
        (described,) = [
            n for n in daemon.ok("list")["controllers"][0]["namespaces"] if n["nsid"] == 1
        ]
        assert described["failure"].startswith(loop)
        daemon.ok("controller", "delete", "vm")
    finally:
        subprocess.run(["losetup", "-d", loop], check=False)
