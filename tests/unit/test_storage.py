"""Host storage: the `nvme0:n1p3` shorthand resolved through sysfs, where a
namespace's bytes live (a partition in its disk's coordinates), and the sharing
rules: no two writable namespaces overlap, windows stay inside their store, storage
the host uses is refused unless forced. sysfs and the mount table are fake trees
here (this machine has no NVMe, and its kernel makes no partitions)."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from nvme_mdev.config import ConfigError, NamespaceSpec
from nvme_mdev.storage import (
    BlockDevice,
    Busy,
    Conflict,
    HostStorage,
    read_mounts,
    resolve_host_nvme,
)

LOOP0 = os.makedev(7, 0)
LOOP0P1 = os.makedev(259, 0)
LOOP0P2 = os.makedev(259, 1)
MIB = 1 << 20


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


# --- nvme0:n1p3 ------------------------------------------------------------------------


@pytest.fixture
def nvme_sysfs(tmp_path: Path) -> Path:
    """Host controller nvme0 (namespaces 1 and 2; namespace 1 has partitions 1 and 3),
    nvme1 with native multipath (its path device nvme1c1n1 stands for disk nvme1n1),
    and nvme2 whose only disk, nvme2n1, is NSID 5."""
    sys = tmp_path / "sys"
    ctrl = sys / "class" / "nvme" / "nvme0"
    write(ctrl / "nvme0n1" / "nsid", "1\n")
    write(ctrl / "nvme0n1" / "nvme0n1p1" / "partition", "1\n")
    write(ctrl / "nvme0n1" / "nvme0n1p3" / "partition", "3\n")
    write(ctrl / "nvme0n2" / "nsid", "2\n")
    write(ctrl / "ng0n1" / "dev", "241:0\n")  # the char device: not a disk
    write(sys / "class" / "nvme" / "nvme1" / "nvme1c1n1" / "nsid", "1\n")
    write(sys / "class" / "block" / "nvme1n1p2" / "partition", "2\n")
    write(sys / "class" / "nvme" / "nvme2" / "nvme2n1" / "nsid", "5\n")
    return sys


@pytest.mark.parametrize(
    ("text", "device"),
    [
        ("nvme0:n1p3", "/dev/nvme0n1p3"),
        ("nvme0:n1p1", "/dev/nvme0n1p1"),
        ("nvme0:n1", "/dev/nvme0n1"),
        ("nvme0:n2", "/dev/nvme0n2"),
        ("nvme1:n1p2", "/dev/nvme1n1p2"),  # multipath: the head disk, not the path
        ("nvme1:n1", "/dev/nvme1n1"),
        ("nvme2:n5", "/dev/nvme2n1"),  # n is the NSID, not the kernel's disk number
    ],
)
def test_host_nvme_shorthand(nvme_sysfs: Path, text: str, device: str) -> None:
    assert resolve_host_nvme(text, nvme_sysfs, Path("/dev")) == device


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("nvme7:n1", r"no host NVMe controller nvme7 \(have: nvme0, nvme1, nvme2\)"),
        ("nvme0:n3", r"nvme0 has no namespace 3 \(has: n1, n2\)"),
        ("nvme0:n1p2", r"nvme0n1 has no partition 2 \(has: nvme0n1p1, nvme0n1p3\)"),
        ("nvme0:n2p1", r"nvme0n2 has no partition 1 \(has: none\)"),
        ("nvme2:n1", r"nvme2 has no namespace 1 \(has: n5\)"),
    ],
)
def test_host_nvme_shorthand_errors(nvme_sysfs: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        resolve_host_nvme(text, nvme_sysfs, Path("/dev"))


@pytest.mark.parametrize("text", ["disk.img", "/dev/nvme0n1p3", "nvme0n1", "null:1G", "a:b"])
def test_other_specs_are_paths(nvme_sysfs: Path, text: str) -> None:
    assert resolve_host_nvme(text, nvme_sysfs, Path("/dev")) == text


def test_no_nvme_at_all(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"no host NVMe controller nvme0 \(have: none\)"):
        resolve_host_nvme("nvme0:n1p3", tmp_path, Path("/dev"))


def test_shorthand_spec_keeps_its_options() -> None:
    spec = NamespaceSpec.parse("nvme0:n1p3,ro,bs=4096,offset=1M,size=2M")
    assert (spec.path, spec.readonly, spec.block_size) == ("nvme0:n1p3", True, 4096)
    assert (spec.offset, spec.size) == (MIB, 2 * MIB)


def test_storage_opens_through_the_shorthand(nvme_sysfs: Path, tmp_path: Path) -> None:
    """The resolved device is what gets opened (a file standing in for /dev here)."""
    dev = tmp_path / "dev"
    dev.mkdir()
    (dev / "nvme0n1p3").write_bytes(bytes(MIB))
    storage = HostStorage(sysfs=nvme_sysfs, dev=dev)
    ns, lease = storage.open(NamespaceSpec.parse("nvme0:n1p3"), 1, "controller a nsid 1")
    assert lease.path == str(dev / "nvme0n1p3") and ns.blocks == MIB // 512
    ns.backend.close()
    lease.release()
    with pytest.raises(ConfigError, match=r"nvme0:n1p1 \(.*nvme0n1p1\): No such file"):
        storage.open(NamespaceSpec.parse("nvme0:n1p1"), 1, "controller a nsid 1")


# --- where the bytes are ---------------------------------------------------------------


@pytest.fixture
def disk_sysfs(tmp_path: Path) -> Path:
    """loop0 (64 MiB) with partitions loop0p1 at 1 MiB and loop0p2 at 17 MiB, 16 MiB
    each, laid out as the kernel does: /sys/dev/block/MAJ:MIN links to the device."""
    sys = tmp_path / "sys"
    disk = sys / "devices" / "virtual" / "block" / "loop0"
    write(disk / "dev", "7:0\n")
    write(disk / "size", str(64 * MIB // 512))
    (disk / "holders").mkdir()
    for n, (rdev, start) in enumerate(((LOOP0P1, 1 * MIB), (LOOP0P2, 17 * MIB)), start=1):
        part = disk / f"loop0p{n}"
        write(part / "dev", f"{os.major(rdev)}:{os.minor(rdev)}\n")
        write(part / "partition", f"{n}\n")
        write(part / "start", str(start // 512))
        write(part / "size", str(16 * MIB // 512))
        (part / "holders").mkdir()
    links = sys / "dev" / "block"
    links.mkdir(parents=True)
    (links / "7:0").symlink_to("../../devices/virtual/block/loop0")
    (links / "259:0").symlink_to("../../devices/virtual/block/loop0/loop0p1")
    (links / "259:1").symlink_to("../../devices/virtual/block/loop0/loop0p2")
    return sys


@dataclass
class FakeStat:
    """What locate() reads of os.stat() for a block device node."""

    st_rdev: int
    st_mode: int = stat.S_IFBLK | 0o600
    st_dev: int = 5
    st_ino: int = 0


def test_partition_in_its_disk_coordinates(disk_sysfs: Path) -> None:
    p2 = BlockDevice.from_sysfs(LOOP0P2, "/dev/loop0p2", disk_sysfs)
    assert (p2.name, p2.disk_name, p2.disk_rdev, p2.start) == ("loop0p2", "loop0", LOOP0, 17 * MIB)
    assert p2.is_partition
    assert [(p.name, p.start, p.size) for p in p2.partitions] == [
        ("loop0p1", 1 * MIB, 16 * MIB),
        ("loop0p2", 17 * MIB, 16 * MIB),
    ]
    disk = BlockDevice.from_sysfs(LOOP0, "/dev/loop0", disk_sysfs)
    assert not disk.is_partition and disk.start == 0 and len(disk.partitions) == 2


def test_device_without_sysfs_is_a_disk_of_its_own(tmp_path: Path) -> None:
    dev = BlockDevice.from_sysfs(os.makedev(8, 0), "/dev/sda", tmp_path)
    assert (dev.name, dev.disk_rdev, dev.start, dev.partitions) == ("sda", dev.rdev, 0, ())


def test_a_partition_and_a_window_of_its_disk_overlap(disk_sysfs: Path) -> None:
    storage = HostStorage(sysfs=disk_sysfs, dev="/dev")
    p2, _ = storage.locate("/dev/loop0p2", FakeStat(LOOP0P2), 0, 16 * MIB)  # type: ignore[arg-type]
    assert (p2.name, p2.start, p2.end) == ("/dev/loop0", 17 * MIB, 33 * MIB)
    # A window of the disk over the end of p2 ...
    window, _ = storage.locate("/dev/loop0", FakeStat(LOOP0), 32 * MIB, 8 * MIB)  # type: ignore[arg-type]
    assert window.overlaps(p2)
    # ... and one past it (the rest of the disk) do not.
    rest, _ = storage.locate("/dev/loop0", FakeStat(LOOP0), 33 * MIB, 31 * MIB)  # type: ignore[arg-type]
    assert not rest.overlaps(p2)
    # A window of p2 is shifted by p2's start.
    inner, _ = storage.locate("/dev/loop0p2", FakeStat(LOOP0P2), MIB, MIB)  # type: ignore[arg-type]
    assert (inner.start, inner.end) == (18 * MIB, 19 * MIB) and inner.overlaps(window) is False
    # Different disks never overlap.
    other, _ = storage.locate("/dev/loop1", FakeStat(os.makedev(7, 1)), 17 * MIB, MIB)  # type: ignore[arg-type]
    assert not other.overlaps(p2)


def test_host_users_of_a_disk(disk_sysfs: Path, tmp_path: Path) -> None:
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text(
        "22 1 254:1 / / rw,relatime shared:1 - ext4 /dev/vda1 rw\n"
        "42 22 259:0 / /srv/my\\040data rw,relatime shared:5 - ext4 /dev/loop0p1 rw\n"
    )
    storage = HostStorage(sysfs=disk_sysfs, dev="/dev", mountinfo=str(mountinfo))

    def users(path: str, rdev: int, offset: int, size: int) -> list[str]:
        st = FakeStat(rdev)
        extent, device = storage.locate(path, st, offset, size)  # type: ignore[arg-type]
        return storage.host_users(path, st, device, extent)  # type: ignore[arg-type]

    # The mounted partition itself.
    assert users("/dev/loop0p1", LOOP0P1, 0, 16 * MIB) == ["mounted at /srv/my data"]
    # A window of the disk over it, and one clear of it.
    (used,) = users("/dev/loop0", LOOP0, 0, 2 * MIB)
    assert used == "partition loop0p1 (1 MiB..17 MiB) is mounted at /srv/my data"
    assert users("/dev/loop0", LOOP0, 40 * MIB, 8 * MIB) == []
    # The other partition.
    assert users("/dev/loop0p2", LOOP0P2, 0, 16 * MIB) == []
    # Something built on top of p2 (device-mapper, RAID).
    (disk_sysfs / "devices/virtual/block/loop0/loop0p2/holders/dm-3").mkdir()
    assert users("/dev/loop0p2", LOOP0P2, 0, 16 * MIB) == ["held by dm-3"]
    assert users("/dev/loop0", LOOP0, 20 * MIB, MIB) == [
        "partition loop0p2 (17 MiB..33 MiB) is held by dm-3"
    ]


def test_host_users_of_a_partition_whose_disk_is_mounted(disk_sysfs: Path, tmp_path: Path) -> None:
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text("42 22 7:0 / /mnt rw - ext4 /dev/loop0 rw\n")
    storage = HostStorage(sysfs=disk_sysfs, dev="/dev", mountinfo=str(mountinfo))
    st = FakeStat(LOOP0P2)
    extent, device = storage.locate("/dev/loop0p2", st, 0, MIB)  # type: ignore[arg-type]
    assert storage.host_users("/dev/loop0p2", st, device, extent) == [  # type: ignore[arg-type]
        "its disk loop0 is mounted at /mnt"
    ]


def test_mountinfo_parsing(tmp_path: Path) -> None:
    path = tmp_path / "mountinfo"
    path.write_text(
        "36 35 98:0 /mnt1 /mnt/parent rw,noatime master:1 - ext3 /dev/root rw,errors=continue\n"
        "garbage\n"
        "37 35 8:3 / /a\\011b rw - btrfs /dev/sda3 rw\n"
    )
    mounts = read_mounts(str(path))
    assert [(m.rdev, m.mountpoint, m.source) for m in mounts] == [
        (os.makedev(98, 0), "/mnt/parent", "/dev/root"),
        (os.makedev(8, 3), "/a\tb", "/dev/sda3"),
    ]
    assert read_mounts(str(tmp_path / "missing")) == []


# --- sharing rules on real files ---------------------------------------------------------


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "shared.img"
    with open(path, "wb") as f:
        f.truncate(64 * MIB)
    return path


@pytest.fixture
def storage(tmp_path: Path) -> HostStorage:
    # An empty sysfs: no loop device is backed by the test's files.
    return HostStorage(sysfs=tmp_path / "nosys", dev="/dev", mountinfo=str(tmp_path / "none"))


def open_ns(storage: HostStorage, spec: str, owner: str = "controller a nsid 1") -> object:
    ns, lease = storage.open(NamespaceSpec.parse(spec), 1, owner)
    return ns, lease


def test_windows_that_do_not_overlap_share_a_file(storage: HostStorage, image: Path) -> None:
    a, la = storage.open(NamespaceSpec.parse(f"{image},size=32M"), 1, "controller a nsid 1")
    b, lb = storage.open(NamespaceSpec.parse(f"{image},offset=32M"), 1, "controller b nsid 1")
    assert (a.blocks, b.blocks) == (32 * MIB // 512, 32 * MIB // 512)
    assert la.extent is not None and lb.extent is not None
    assert (la.extent.start, la.extent.end, lb.extent.start, lb.extent.end) == (
        0,
        32 * MIB,
        32 * MIB,
        64 * MIB,
    )
    for ns, lease in ((a, la), (b, lb)):
        ns.backend.close()
        lease.release()


def test_overlapping_writable_namespaces_are_refused(storage: HostStorage, image: Path) -> None:
    a, la = storage.open(
        NamespaceSpec.parse(f"{image},offset=8M,size=8M"), 1, "controller a nsid 1"
    )
    with pytest.raises(Conflict) as refused:
        storage.open(NamespaceSpec.parse(f"{image},offset=15M,size=2M"), 2, "controller b nsid 2")
    message = str(refused.value)
    assert "controller a nsid 1" in message and "8 MiB..16 MiB" in message
    assert "15 MiB..17 MiB" in message and "\n" not in message
    # The whole file overlaps it too; through a hard link (another name, same inode) too.
    with pytest.raises(Conflict):
        storage.open(NamespaceSpec.parse(str(image)), 2, "controller b nsid 2")
    link = image.with_name("link.img")
    os.link(image, link)
    with pytest.raises(Conflict, match="controller a nsid 1"):
        storage.open(NamespaceSpec.parse(f"{link},offset=12M,size=1M"), 2, "controller b nsid 2")
    # Read-only namespaces may look at the same bytes.
    ro, lro = storage.open(NamespaceSpec.parse(f"{image},ro"), 2, "controller b nsid 2")
    ro.backend.close()
    lro.release()
    # Released: the bytes are free again.
    a.backend.close()
    la.release()
    la.release()  # twice is harmless
    b, lb = storage.open(NamespaceSpec.parse(str(image)), 2, "controller b nsid 2")
    b.backend.close()
    lb.release()
    assert storage.uses() == []


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (",offset=60M,size=8M", "reaches past the end"),
        (",offset=64M", "past the end"),
        (",offset=100", "not a multiple of the 512-byte block size"),
        (",offset=4K,bs=4096,size=1K", "smaller than one block"),
    ],
)
def test_a_window_stays_inside_its_store(
    storage: HostStorage, image: Path, options: str, message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        storage.open(NamespaceSpec.parse(f"{image}{options}"), 1, "controller a nsid 1")
    assert storage.uses() == []


def test_a_file_behind_a_loop_device_is_busy(tmp_path: Path, image: Path) -> None:
    sys = tmp_path / "sys"
    write(sys / "block" / "loop3" / "loop" / "backing_file", f"{image}\n")
    write(sys / "block" / "loop4" / "loop" / "backing_file", "/gone (deleted)\n")
    storage = HostStorage(sysfs=sys, dev="/dev", mountinfo=str(tmp_path / "none"))
    with pytest.raises(Busy, match=r"loop device /dev/loop3 is backed by it.*add force"):
        storage.open(NamespaceSpec.parse(str(image)), 1, "controller a nsid 1")
    ns, lease = storage.open(NamespaceSpec.parse(f"{image},force"), 1, "controller a nsid 1")
    ns.backend.close()
    lease.release()


def test_missing_and_odd_paths(storage: HostStorage, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="No such file"):
        storage.open(NamespaceSpec.parse(str(tmp_path / "missing.img")), 1, "a")
    with pytest.raises(ConfigError, match="not a regular file or block device"):
        storage.open(NamespaceSpec.parse(str(tmp_path)), 1, "a")
    ns, lease = storage.open(NamespaceSpec.parse("null:1M"), 1, "a")
    assert ns.blocks == MIB // 512 and lease.extent is None
    lease.release()


def test_spec_text_round_trips() -> None:
    for text in ["a.img", "a.img,ro", "a.img,bs=4096,offset=1G,size=512M", "/dev/x,force"]:
        spec = NamespaceSpec.parse(text)
        assert spec.text() == text
        assert NamespaceSpec.parse(spec.text()) == spec
    assert NamespaceSpec.parse("a,offset=1536,size=1000").text() == "a,offset=1536,size=1000"


def test_growth_into_another_namespace_is_refused(storage: HostStorage, tmp_path: Path) -> None:
    """A window to the end of a file that grew follows it; growing into bytes another
    writable namespace took meanwhile is refused, and the extent stays as it was."""
    path = tmp_path / "growing.img"
    with open(path, "wb") as f:
        f.truncate(32 * MIB)
    a, la = storage.open(NamespaceSpec.parse(f"{path},offset=16M"), 1, "controller a nsid 1")
    os.truncate(path, 64 * MIB)
    # Another namespace takes bytes 48..64 MiB, past a's extent as it was opened.
    b, lb = storage.open(NamespaceSpec.parse(f"{path},offset=48M"), 1, "controller b nsid 1")
    assert a.backend.current_size() == 48 * MIB
    with pytest.raises(Conflict) as refused:
        la.resize(a.backend.current_size(), "controller a nsid 1")
    message = str(refused.value)
    assert message.startswith("controller a nsid 1: growing to 48 MiB")
    assert "overlap controller b nsid 1 (bytes 48 MiB..64 MiB)" in message
    assert "keeps 16 MiB" in message and "\n" not in message
    assert la.extent is not None and (la.extent.start, la.extent.end) == (16 * MIB, 32 * MIB)
    # Once b is gone, a may grow; and shrinking is always allowed.
    b.backend.close()
    lb.release()
    la.resize(48 * MIB, "controller a nsid 1")
    assert la.extent is not None and la.extent.end == 64 * MIB
    la.resize(MIB, "controller a nsid 1")
    assert la.extent is not None and la.extent.end == 17 * MIB
    assert la.replaced() is None
    os.unlink(path)
    assert "was unlinked; the namespace still uses the open file" in str(la.replaced())
    a.backend.close()
    la.release()


# Holds namespaces of a file in a process of its own (another daemon) until stdin closes.
_OTHER_PROCESS = """
import sys
from nvme_mdev.config import NamespaceSpec
from nvme_mdev.storage import HostStorage
storage = HostStorage(sysfs=sys.argv[1], mountinfo=sys.argv[1] + "/none")
held = [storage.open(NamespaceSpec.parse(spec), 1, "other") for spec in sys.argv[2:]]
print("holding", flush=True)
sys.stdin.read()
"""


class OtherProcess:
    def __init__(self, tmp_path: Path, *specs: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _OTHER_PROCESS, str(tmp_path / "nosys"), *specs],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert self.proc.stdout is not None and self.proc.stdout.readline() == "holding\n"

    def exit(self) -> None:
        self.proc.communicate(timeout=30)
        assert self.proc.returncode == 0


def test_another_process_writing_the_bytes_is_refused(
    storage: HostStorage, image: Path, tmp_path: Path
) -> None:
    """Two nvme-mdev processes on one image file: writable namespaces may not overlap
    there either; read-only ones and disjoint windows may share it."""
    other = OtherProcess(tmp_path, f"{image},offset=8M,size=8M")
    try:
        with pytest.raises(Conflict) as refused:
            storage.open(NamespaceSpec.parse(f"{image},offset=15M,size=2M"), 1, "mine")
        message = str(refused.value)
        assert "15 MiB..17 MiB are written by a namespace of another nvme-mdev process" in message
        assert "\n" not in message
        with pytest.raises(Conflict):
            storage.open(NamespaceSpec.parse(str(image)), 1, "mine")
        reader, lr = storage.open(NamespaceSpec.parse(f"{image},ro"), 1, "mine")
        before, lb = storage.open(NamespaceSpec.parse(f"{image},size=8M"), 2, "mine")
        after, la = storage.open(NamespaceSpec.parse(f"{image},offset=16M"), 3, "mine")
        for ns, lease in ((reader, lr), (before, lb), (after, la)):
            ns.backend.close()  # type: ignore[attr-defined]
            lease.release()
    finally:
        other.exit()
    # The other process is gone, and its locks with it.
    ns, lease = storage.open(NamespaceSpec.parse(str(image)), 1, "mine")
    ns.backend.close()  # type: ignore[attr-defined]
    lease.release()


def test_growth_into_another_process_bytes_is_refused(storage: HostStorage, tmp_path: Path) -> None:
    path = tmp_path / "growing.img"
    with open(path, "wb") as f:
        f.truncate(32 * MIB)
    a, la = storage.open(NamespaceSpec.parse(f"{path},offset=16M"), 1, "controller a nsid 1")
    os.truncate(path, 64 * MIB)
    other = OtherProcess(tmp_path, f"{path},offset=48M")
    try:
        with pytest.raises(Conflict, match="written by a namespace of another nvme-mdev process"):
            la.resize(48 * MIB, "controller a nsid 1")
        assert la.extent is not None and la.extent.end == 32 * MIB
        la.resize(MIB, "controller a nsid 1")  # shrinking gives bytes back ...
    finally:
        other.exit()
    la.resize(48 * MIB, "controller a nsid 1")  # ... and growing into free ones works
    assert la.extent is not None and la.extent.end == 64 * MIB
    a.backend.close()  # type: ignore[attr-defined]
    la.release()
