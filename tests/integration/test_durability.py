"""Crash consistency: what a completed command promises to have made durable is still
there after a power cut.

The namespace's image file lives on a FUSE filesystem (durable_fuse.py, in a process
of its own) that keeps two states of it: what was written, and what of that was made
durable, as the kernel tells a FUSE filesystem: a write that carries O_DSYNC (RWF_DSYNC,
or an O_DSYNC descriptor), or an fsync/fdatasync of the file. A "power cut" keeps only
the durable state. The kernel's page cache is kept out of the way (direct_io, no
writeback cache), so that neither the device nor the test reads back a write that the
filesystem has forgotten. The whole device is driven over its vfio-user socket by the
project's host driver, for each data plane and I/O engine, io_uring also with the
image opened O_DIRECT (where the engine sends every aligned write past the page cache).

What the tests hold the device to (NVMe Base 2.1, 5.27.1.4 and 7.2; NVM Command Set
3.2.6 FUA):
- a Write with FUA is durable when it completes;
- writes completed before a Flush completed are durable after the Flush;
- with the Volatile Write Cache off (Set Features, WCE = 0), every completed write is;
- after a normal shutdown notification (CC.SHN 01b) reports CSTS.SHST complete,
  every completed write is;
and, to show that the harness can fail: a write with the cache on and no Flush is
forgotten by the power cut (the device reads back zeroes).
"""

from __future__ import annotations

import contextlib
import ctypes.util
import importlib.util
import json
import mmap
import os
import select
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from nvme_mdev.backends import uring
from nvme_mdev.config import NamespaceSpec
from nvme_mdev.dataplane import DATA_PLANES
from nvme_mdev.nvme.spec import FeatureId, IoOpcode
from nvme_mdev.nvme_host import HostQueuePair, NvmeHost, flush, nvm_command
from nvme_mdev.virtual_controller import VirtualController

HELPER = Path(__file__).with_name("durable_fuse.py")
#: the durable_fuse process's exit status when the mount itself was refused
MOUNT_REFUSED = 3
NSID = 1
BS = 4096
IMAGE_SIZE = 1 << 20
BROADCAST = 0xFFFFFFFF
#: Volatile Write Cache enabled (Feature 06h, CDW11 bit 0)
WCE = 1

ENGINES = ["sync"] if uring.unavailable() else ["sync", "uring"]
#: PLANE-ENGINE, and PLANE-uring-direct: the image also opened O_DIRECT (direct=on)
VARIANTS = [f"{plane}-{engine}" for plane in DATA_PLANES for engine in ENGINES] + [
    f"{plane}-uring-direct" for plane in DATA_PLANES if "uring" in ENGINES
]


def fuse_unavailable() -> str | None:
    """Why this machine cannot mount the test's FUSE filesystem, or None."""
    if os.geteuid() != 0:
        return "mounting a FUSE filesystem needs root here"
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse (FUSE is not available in this kernel or container)"
    if importlib.util.find_spec("mfusepy") is None:
        return "mfusepy is not installed (pip install -e '.[dev]')"
    if ctypes.util.find_library("fuse3") is None:
        return "libfuse3 is not installed (apt-get install fuse3, as scripts/setup.sh does)"
    return None


class DurableMount:
    """durable_fuse.py mounted on `mountpoint`, and the line it is asked through."""

    def __init__(self, mountpoint: Path, log: Path) -> None:
        self.mountpoint = mountpoint
        self.log = log
        with open(log, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, str(HELPER), str(mountpoint)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                bufsize=0,
            )
        self._pending = b""
        try:
            hello, _ = self._answer(timeout=30.0)
        except (EOFError, TimeoutError) as exc:
            self.close()
            if self.proc.returncode == MOUNT_REFUSED:
                pytest.skip(f"FUSE mount refused: {self.stderr()}")
            raise AssertionError(f"durable_fuse did not start ({exc}): {self.stderr()}") from exc
        assert hello.get("ready"), hello

    def stderr(self) -> str:
        return self.log.read_text(errors="replace").strip()[-2000:]

    def _fill(self, until: int | bytes, deadline: float) -> None:
        """Read from the helper until `until` bytes (or a line end) are pending."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        while not (
            len(self._pending) >= until if isinstance(until, int) else until in self._pending
        ):
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise TimeoutError("durable_fuse did not answer")
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                self.proc.wait(10)
                raise EOFError(f"durable_fuse exited with {self.proc.returncode}")
            self._pending += chunk

    def _answer(self, timeout: float = 10.0) -> tuple[dict[str, Any], bytes]:
        deadline = time.monotonic() + timeout
        self._fill(b"\n", deadline)
        line, self._pending = self._pending.split(b"\n", 1)
        answer: dict[str, Any] = json.loads(line)
        size = answer.get("size", 0)
        self._fill(size, deadline)
        data, self._pending = self._pending[:size], self._pending[size:]
        return answer, data

    def ask(self, op: str, name: str = "") -> tuple[dict[str, Any], bytes]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"op": op, "name": name}).encode() + b"\n")
        answer, data = self._answer()
        assert "error" not in answer, answer["error"]
        return answer, data

    def written(self, name: str) -> bytes:
        """What reads of the file return now (durable or not)."""
        return self.ask("written", name)[1]

    def powercut(self, name: str) -> bytes:
        """Forget what of the file was not made durable; what is left."""
        return self.ask("powercut", name)[1]

    def stats(self, name: str) -> dict[str, int]:
        """What the kernel sent for the file (writes, O_DSYNC writes, fsyncs...)."""
        stats: dict[str, int] = self.ask("stats", name)[0]["stats"]
        return stats

    def close(self) -> None:
        """Unmount (the helper does when its input closes) and wait for it."""
        if self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        if self.mounted():  # (the helper died: its mount is left, disconnected)
            subprocess.run(["umount", "-l", str(self.mountpoint)], check=False)

    def mounted(self) -> bool:
        # (not os.path.ismount: a mount whose filesystem process died fails stat)
        with open("/proc/self/mounts") as mounts:
            return any(line.split()[1] == str(self.mountpoint) for line in mounts)


@pytest.fixture(scope="module")
def fuse_mount(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DurableMount]:
    reason = fuse_unavailable()
    if reason:
        pytest.skip(reason)
    mountpoint = tmp_path_factory.mktemp("durable-mnt")
    log = tmp_path_factory.mktemp("durable-log") / "durable_fuse.log"
    mount = DurableMount(mountpoint, log)
    yield mount
    mount.close()


def make_image(mount: DurableMount) -> str:
    """A new zeroed image file on the mount (durable: only data is volatile there)."""
    name = f"ns-{uuid.uuid4().hex[:12]}.img"
    fd = os.open(mount.mountpoint / name, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644)
    try:
        os.ftruncate(fd, IMAGE_SIZE)
    finally:
        os.close(fd)
    return name


class Device:
    """A controller whose one namespace (4 KiB blocks) is an image on the FUSE mount."""

    def __init__(self, mount: DurableMount, variant: str, socket_path: Path) -> None:
        plane, engine, *direct = variant.split("-")
        self.mount = mount
        self.variant = variant
        self.name = make_image(mount)
        options = ",bs=4096" + (",direct=on" if direct else "")
        namespace = NamespaceSpec.parse(f"{mount.mountpoint / self.name}{options}").open(NSID)
        self.controller = VirtualController(
            str(socket_path), [namespace], poll_timeout=0.05, io_engine=engine, data_plane=plane
        )
        self.controller.start()

    @contextlib.contextmanager
    def connect(self) -> Iterator[tuple[NvmeHost, HostQueuePair]]:
        with NvmeHost(self.controller.server.socket_path) as host:
            host.enable()
            yield host, host.create_queue_pair(1, entries=64, vector=1)

    def powercut(self) -> bytes:
        return self.mount.powercut(self.name)

    def why(self) -> str:
        """For a failure's message: what the filesystem saw."""
        return f"{self.variant}: the filesystem saw {self.mount.stats(self.name)}"

    def stop(self) -> None:
        self.controller.stop()
        os.unlink(self.mount.mountpoint / self.name)


@pytest.fixture(params=VARIANTS)
def device(
    request: pytest.FixtureRequest, fuse_mount: DurableMount, tmp_path: Path
) -> Iterator[Device]:
    dev = Device(fuse_mount, request.param, tmp_path / "nvme.sock")
    yield dev
    dev.stop()


def pattern(tag: int, blocks: int) -> bytes:
    """`blocks` blocks of data that no other tag's data equals, and that is not zeroes."""
    return bytes((tag * 37 + i) & 0xFF or 1 for i in range(256)) * (blocks * BS // 256)


def write_command(host: NvmeHost, slba: int, data: bytes, fua: bool = False) -> list[int]:
    buf = host.alloc(len(data))
    host.ram.write(buf, data)
    prp1, prp2 = host.prps(buf, len(data))
    return nvm_command(IoOpcode.WRITE, NSID, slba, len(data) // BS, prp1, prp2, fua=fua)


def write_all(
    host: NvmeHost, q: HostQueuePair, writes: dict[int, bytes], fua: bool = False
) -> None:
    """Submit the writes together (many in flight with io_uring) and wait for them all."""
    cids = q.submit_batch([write_command(host, slba, data, fua) for slba, data in writes.items()])
    done = q.wait(len(cids))
    assert sorted(c.cid for c in done) == sorted(cids)
    assert all(c.ok for c in done), [hex(c.status) for c in done]


def at(image: bytes, slba: int, length: int) -> bytes:
    return image[slba * BS : slba * BS + length]


def assert_kept(device: Device, image: bytes, writes: dict[int, bytes]) -> None:
    lost = [slba for slba, data in writes.items() if at(image, slba, len(data)) != data]
    assert not lost, f"writes at LBAs {lost} lost by the power cut; {device.why()}"


#: a few writes: one block, several (a PRP list), scattered over the namespace
WRITES = {0: pattern(1, 1), 16: pattern(2, 4), 101: pattern(3, 2), 255: pattern(4, 1)}


def test_a_fua_write_is_durable_when_it_completes(device: Device) -> None:
    with device.connect() as (host, q):
        for slba, data in WRITES.items():  # one at a time: each checked alone
            c = q.command(write_command(host, slba, data, fua=True))
            assert c.ok, hex(c.status)
            assert_kept(device, device.powercut(), {slba: data})


def test_fua_writes_in_flight_together_are_durable_when_they_complete(device: Device) -> None:
    with device.connect() as (host, q):
        write_all(host, q, WRITES, fua=True)
        image = device.powercut()
    assert_kept(device, image, WRITES)


@pytest.mark.parametrize("nsid", [NSID, BROADCAST], ids=["nsid", "broadcast"])
def test_writes_completed_before_a_flush_are_durable_after_it(device: Device, nsid: int) -> None:
    with device.connect() as (host, q):
        write_all(host, q, WRITES)
        c = q.command(flush(nsid))
        assert c.ok, hex(c.status)
        image = device.powercut()
    assert_kept(device, image, WRITES)


def test_with_the_write_cache_off_every_completed_write_is_durable(device: Device) -> None:
    with device.connect() as (host, q):
        assert host.set_features(FeatureId.VOLATILE_WRITE_CACHE, 0).ok
        c, _ = host.get_features(FeatureId.VOLATILE_WRITE_CACHE)
        assert c.ok and not c.dw0 & WCE
        write_all(host, q, WRITES)
        image = device.powercut()
    assert_kept(device, image, WRITES)


def test_a_normal_shutdown_makes_every_completed_write_durable(device: Device) -> None:
    with device.connect() as (host, q):
        write_all(host, q, WRITES)
        host.shutdown()  # CC.SHN 01b; returns once CSTS.SHST = 10b (complete)
        image = device.powercut()
    assert_kept(device, image, WRITES)


def test_control_a_cached_write_without_flush_is_lost_at_the_power_cut(device: Device) -> None:
    """The harness can fail: with the cache on, a completed write that nothing made
    durable reached the filesystem, and the power cut forgets it; the device then
    reads back what survived (zeroes), not a copy some cache kept."""
    data = pattern(9, 2)
    with device.connect() as (host, q):
        c, _ = host.get_features(FeatureId.VOLATILE_WRITE_CACHE)
        assert c.ok and c.dw0 & WCE
        write_all(host, q, {40: data})
        assert at(device.mount.written(device.name), 40, len(data)) == data, device.why()
        image = device.powercut()
        assert at(image, 40, len(data)) == bytes(len(data)), f"not forgotten: {device.why()}"
        buf = host.alloc(len(data))
        prp1, prp2 = host.prps(buf, len(data))
        c = q.command(nvm_command(IoOpcode.READ, NSID, 40, len(data) // BS, prp1, prp2))
        assert c.ok, hex(c.status)
        assert host.ram.read(buf, len(data)) == bytes(len(data))


def test_the_filesystem_keeps_what_the_kernel_says_is_durable(fuse_mount: DurableMount) -> None:
    """The harness itself, with plain system calls: what the kernel passes to a FUSE
    filesystem tells it which writes to keep."""
    name = make_image(fuse_mount)
    path = fuse_mount.mountpoint / name
    a, b, c, d, e = (pattern(tag, 1) for tag in range(11, 16))
    fd = os.open(path, os.O_RDWR)
    dsync_fd = os.open(path, os.O_RDWR | os.O_DSYNC)
    direct_fd = os.open(path, os.O_RDWR | os.O_DIRECT)
    aligned = mmap.mmap(-1, BS)  # O_DIRECT wants an aligned buffer
    try:
        os.pwrite(fd, a, 0)  # plain: volatile
        os.pwritev(fd, [b], BS, os.RWF_DSYNC)  # durable, alone
        os.pwrite(dsync_fd, c, 2 * BS)  # durable: an O_DSYNC descriptor
        aligned[:] = d
        os.pwrite(direct_fd, aligned, 3 * BS)  # O_DIRECT: volatile still
        written, durable = fuse_mount.written(name), fuse_mount.ask("durable", name)[1]
        assert written[: 4 * BS] == a + b + c + d
        assert durable[: 4 * BS] == bytes(BS) + b + c + bytes(BS), fuse_mount.stats(name)
        os.fdatasync(fd)  # everything written before it
        os.pwrite(fd, e, 4 * BS)  # volatile again
        image = fuse_mount.powercut(name)
        assert image[: 5 * BS] == a + b + c + d + bytes(BS), fuse_mount.stats(name)
        # Read back through the kernel: what the power cut left, no cached copy
        assert os.pread(fd, 5 * BS, 0) == image[: 5 * BS]
        stats = fuse_mount.stats(name)
        assert stats["writepage_writes"] == 0  # no writeback cache
        assert stats["dsync_writes"] == 2 and stats["fdatasyncs"] == 1, stats
    finally:
        aligned.close()
        for f in (fd, dsync_fd, direct_fd):
            os.close(f)
        os.unlink(path)
