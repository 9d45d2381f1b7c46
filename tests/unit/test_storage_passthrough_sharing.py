"""The sharing rules for NVMe passthrough namespaces (storage.HostStorage): a host
namespace passed through is the same bytes as its block device, so the block device's
rules hold. Its extent is the whole disk (a partition or a window of that disk, or
the disk itself, overlaps it); two writers may share no byte, readers share anything;
storage the host uses (a mounted partition, a holder on top) is refused unless
`force`; the block device is claimed exclusively (O_EXCL) unless `force`, once per
disk; a namespace without a block device is its ng device's bytes. A refusal or
failure leaves no claim and no open backend behind.

No NVMe device here: sysfs is a fake tree, device nodes are plain files that the
storage module is told are block and character devices (its `os.stat`), and the
backends are fakes (the ng device's ioctls, the block device's size)."""

from __future__ import annotations

import contextlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import pytest

from nvme_mdev import storage as storage_module
from nvme_mdev.config import ConfigError, NamespaceSpec
from nvme_mdev.storage import Busy, Conflict, HostStorage, Lease

MIB = 1 << 20
NVME0N1 = os.makedev(259, 0)
NVME0N1P1 = os.makedev(259, 1)
NG0N1 = os.makedev(241, 0)
NG0N2 = os.makedev(241, 1)
DISK = 64 * MIB


@dataclass
class FakeStat:
    st_rdev: int
    st_mode: int
    st_dev: int = 5
    st_ino: int = 0


class OsWithDevices:
    """The os module, as the storage module sees it, with some plain files standing in
    for device nodes in `stat`."""

    def __init__(self, nodes: dict[str, FakeStat]) -> None:
        self._nodes = nodes

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)

    def stat(self, path: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(path, str | os.PathLike):
            fake = self._nodes.get(os.fspath(path))
            if fake is not None:
                return fake
        return os.stat(path, *args, **kwargs)


class FakeBackend:
    """What both fakes share: they open no descriptor (so that the only descriptors on
    a device node are the storage's claims) and remember being closed."""

    made: ClassVar[list[FakeBackend]] = []
    block_size = 512
    is_block_device = True

    def __init__(self, path: str, readonly: bool = False, **_: object) -> None:
        self.description = path
        self.readonly = readonly
        self.closed = False
        FakeBackend.made.append(self)

    def close(self) -> None:
        self.closed = True

    def flush(self) -> None:
        pass

    def store_size(self) -> int:
        return int(self.size)  # type: ignore[attr-defined]


class FakePassthrough(FakeBackend):
    passthrough = True
    #: namespace size by ng device name
    sizes: ClassVar[dict[str, int]] = {}

    def __init__(self, path: str, readonly: bool = False, **kw: object) -> None:
        super().__init__(path, readonly)
        self.size = self.sizes[Path(path).name]


class FakeBlockDevice(FakeBackend):
    """FileBackend on a block device: its size is the stand-in file's."""

    def __init__(self, path: str, readonly: bool = False, **kw: object) -> None:
        super().__init__(path, readonly)
        self.size = os.path.getsize(path)


@dataclass
class Tree:
    storage: HostStorage
    dev: Path
    sysfs: Path
    mountinfo: Path

    def open(self, text: str, owner: str = "controller a nsid 1") -> tuple[Any, Lease]:
        return self.storage.open(NamespaceSpec.parse(text.replace("DEV", str(self.dev))), 1, owner)

    def claims(self, name: str) -> int:
        """Descriptors of this process on /dev/`name` (the storage's O_EXCL claims)."""
        return fds_on(self.dev / name)


def fds_on(path: Path) -> int:
    real = os.path.realpath(path)
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            count += os.readlink(f"/proc/self/fd/{fd}") == real
    return count


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


@pytest.fixture
def tree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Tree:
    """Host namespace nvme0n1 (64 MiB, partition nvme0n1p1 at 1 MiB, 16 MiB) with its ng
    device ng0n1, and ng0n2: a namespace with no block device (a format the block layer
    does not take)."""
    sysfs, dev = tmp_path / "sys", tmp_path / "dev"
    disk = sysfs / "devices" / "virtual" / "nvme-subsystem" / "nvme0n1"
    write(disk / "dev", "259:0\n")
    write(disk / "size", str(DISK // 512))
    (disk / "holders").mkdir()
    part = disk / "nvme0n1p1"
    write(part / "dev", "259:1\n")
    write(part / "partition", "1\n")
    write(part / "start", str(MIB // 512))
    write(part / "size", str(16 * MIB // 512))
    (part / "holders").mkdir()
    links = sysfs / "dev" / "block"
    links.mkdir(parents=True)
    (links / "259:0").symlink_to("../../devices/virtual/nvme-subsystem/nvme0n1")
    (links / "259:1").symlink_to("../../devices/virtual/nvme-subsystem/nvme0n1/nvme0n1p1")
    dev.mkdir()
    for name, size in (("nvme0n1", DISK), ("nvme0n1p1", 16 * MIB), ("ng0n1", 0), ("ng0n2", 0)):
        with open(dev / name, "wb") as f:
            f.truncate(size)
    nodes = {
        str(dev / "nvme0n1"): FakeStat(NVME0N1, stat.S_IFBLK | 0o600),
        str(dev / "nvme0n1p1"): FakeStat(NVME0N1P1, stat.S_IFBLK | 0o600),
        str(dev / "ng0n1"): FakeStat(NG0N1, stat.S_IFCHR | 0o600),
        str(dev / "ng0n2"): FakeStat(NG0N2, stat.S_IFCHR | 0o600),
    }
    monkeypatch.setattr(storage_module, "os", OsWithDevices(nodes))
    monkeypatch.setattr(storage_module, "PassthroughBackend", FakePassthrough)
    monkeypatch.setattr(storage_module, "FileBackend", FakeBlockDevice)
    monkeypatch.setattr(FakePassthrough, "sizes", {"ng0n1": DISK, "ng0n2": 8 * MIB})
    monkeypatch.setattr(FakeBackend, "made", [])
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text("22 1 254:1 / / rw,relatime shared:1 - ext4 /dev/vda1 rw\n")
    return Tree(HostStorage(sysfs=sysfs, dev=dev, mountinfo=str(mountinfo)), dev, sysfs, mountinfo)


def close(*opened: tuple[Any, Lease]) -> None:
    for ns, lease in opened:
        ns.backend.close()
        lease.release()


def test_a_passthrough_namespace_is_its_whole_disk_claimed_exclusively(tree: Tree) -> None:
    for text in ("DEV/ng0n1,passthrough", "DEV/nvme0n1,passthrough"):
        ns, lease = tree.open(text)
        assert ns.passthrough and lease.path == str(tree.dev / "ng0n1")
        assert lease.extent is not None
        assert (lease.extent.name, lease.extent.start, lease.extent.end) == (
            str(tree.dev / "nvme0n1"),
            0,
            DISK,
        )
        assert tree.claims("nvme0n1") == 1  # the block device, O_EXCL
        close((ns, lease))
        assert tree.claims("nvme0n1") == 0
    assert tree.storage.uses() == []


@pytest.mark.parametrize(
    "other",
    [
        "DEV/nvme0n1p1",  # a partition of its disk
        "DEV/nvme0n1,offset=60M",  # a window of its disk
        "DEV/nvme0n1",  # the disk itself
        "DEV/nvme0n1,passthrough",  # the namespace passed through again
    ],
)
def test_a_writable_passthrough_shares_no_byte_with_another_writer(tree: Tree, other: str) -> None:
    first = tree.open("DEV/ng0n1,passthrough")
    with pytest.raises(Conflict, match="controller a nsid 1"):
        tree.open(other, "controller b nsid 2")
    assert FakeBackend.made[-1].closed  # the refused one's backend
    # Readers share anything, under the one claim of the disk.
    second = tree.open(other + ",ro", "controller b nsid 2")
    assert tree.claims("nvme0n1") == 1 and tree.claims("nvme0n1p1") == 0
    close(second)
    assert tree.claims("nvme0n1") == 1
    close(first)
    assert tree.claims("nvme0n1") == 0
    close(tree.open(other))  # released: its bytes are free for a writer


@pytest.mark.parametrize("first_text", ["DEV/nvme0n1p1", "DEV/nvme0n1,offset=8M,size=1M"])
def test_a_passthrough_is_refused_over_bytes_a_writer_has(tree: Tree, first_text: str) -> None:
    first = tree.open(first_text)
    claims = tree.claims("nvme0n1") + tree.claims("nvme0n1p1")
    with pytest.raises(Conflict, match="controller a nsid 1"):
        tree.open("DEV/ng0n1,passthrough", "controller b nsid 2")
    assert FakeBackend.made[-1].closed
    assert tree.claims("nvme0n1") + tree.claims("nvme0n1p1") == claims  # no claim added
    close(tree.open("DEV/ng0n1,passthrough,ro", "controller b nsid 2"))
    close(first)
    assert tree.storage.uses() == []


def test_a_read_only_passthrough_shares_with_a_writer(tree: Tree) -> None:
    reader = tree.open("DEV/nvme0n1,passthrough,ro")
    writer = tree.open("DEV/nvme0n1p1", "controller b nsid 2")
    assert [w for _, _, w in tree.storage.uses()] == [False, True]
    close(writer, reader)


@pytest.mark.parametrize("readonly", [False, True])
def test_a_passthrough_of_a_disk_the_host_uses_is_busy_unless_forced(
    tree: Tree, readonly: bool
) -> None:
    ro = ",ro" if readonly else ""
    with open(tree.mountinfo, "a") as f:
        f.write(f"42 22 259:1 / /srv rw - ext4 {tree.dev}/nvme0n1p1 rw\n")
    with pytest.raises(Busy, match=r"partition nvme0n1p1 .* is mounted at /srv"):
        tree.open("DEV/ng0n1,passthrough" + ro)
    assert FakeBackend.made[-1].closed and tree.claims("nvme0n1") == 0
    forced = tree.open("DEV/ng0n1,passthrough,force" + ro)
    assert tree.claims("nvme0n1") == 0  # forced: no exclusive claim
    close(forced)
    tree.mountinfo.write_text("")
    (tree.sysfs / "devices/virtual/nvme-subsystem/nvme0n1/holders/dm-0").mkdir()
    with pytest.raises(Busy, match="held by dm-0"):
        tree.open("DEV/ng0n1,passthrough" + ro)
    assert tree.storage.uses() == []


def test_a_namespace_without_a_block_device_is_its_ng_device(tree: Tree) -> None:
    first = tree.open("DEV/ng0n2,passthrough")
    _, lease = first
    assert lease.extent is not None and lease.extent.store == ("ng", 241, 1)
    assert (lease.extent.start, lease.extent.end) == (0, 8 * MIB)
    with pytest.raises(Conflict, match="controller a nsid 1"):
        tree.open("DEV/ng0n2,passthrough", "controller b nsid 2")
    reader = tree.open("DEV/ng0n2,passthrough,ro", "controller b nsid 2")
    other = tree.open("DEV/ng0n1,passthrough", "controller c nsid 1")  # another namespace
    close(first, reader, other)
    assert tree.storage.uses() == []


def test_a_passthrough_that_fails_after_its_claim_lets_it_go(tree: Tree) -> None:
    FakePassthrough.sizes["ng0n1"] = 256  # smaller than one block: the namespace is refused
    with pytest.raises(ConfigError, match="smaller than one block"):
        tree.open("DEV/ng0n1,passthrough")
    assert FakeBackend.made[-1].closed
    assert tree.claims("nvme0n1") == 0
    assert tree.storage.uses() == []
    FakePassthrough.sizes["ng0n1"] = DISK
    close(tree.open("DEV/nvme0n1p1"))  # nothing of it is held
