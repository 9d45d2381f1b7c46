"""Host storage shared safely: where each namespace's bytes live on the host, and the
rules for sharing them among namespaces, controllers and the host itself.

- `resolve_host_nvme`: the original design's shorthand `nvme0:n1p3` (partition 3 of
  namespace 1 of host controller nvme0) → /dev/nvme0n1p3, through sysfs.
- An `Extent` is a namespace's bytes in the coordinates of what really stores them:
  a file's inode, or a whole disk (a partition's start comes from sysfs), so that a
  partition and a window of its disk compare.
- `HostStorage` opens namespace specs for one process (the daemon, or `serve`):
  no two writable namespaces may overlap; a window stays inside its store; storage
  the host uses (a mounted filesystem, device-mapper or RAID on top, a loop device
  over a file) is refused unless the spec says `force`; block devices are claimed
  exclusively (O_EXCL), once per disk, however many namespaces share it.
- Across processes (two daemons, or `serve`s, on one image file): a writable
  namespace of a file holds an open-file-description lock on its bytes (see
  `WriterLock`), so a second process's writable namespace over them is refused.
- A Ceph RBD image (`rbd:POOL/IMAGE`) is a store of its own, known by its cluster,
  pool and image ids however it is named; across processes and hosts a writable one
  holds the image's exclusive lock (backends/rbd.py).
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import logging
import os
import re
import stat
import struct
import threading
from dataclasses import dataclass
from pathlib import Path

from .backends.base import Backend
from .backends.file import BackendError, FileBackend
from .backends.passthrough import PassthroughBackend, block_name_for, ng_name_for
from .config import ConfigError, NamespaceSpec, make_namespace, window
from .handover import descriptors
from .nvme.namespace import Namespace

log = logging.getLogger(__name__)

SECTOR = 512  # sysfs gives partition starts and sizes in 512-byte sectors, always

HOST_NVME = re.compile(r"^(nvme\d+):n(\d+)(?:p(\d+))?$")
# A namespace's block device under /sys/class/nvme/nvmeX: nvme0n1, or with native
# multipath the controller's hidden path device nvme0c0n1.
_NAMESPACE_DISK = re.compile(r"^nvme\d+(?:c\d+)?n\d+$")


class Conflict(ConfigError):
    """Two namespaces of this process would write the same bytes."""


class Busy(ConfigError):
    """The host uses the storage (mounted, held by another program)."""


def resolve_host_nvme(text: str, sysfs: Path = Path("/sys"), dev: Path = Path("/dev")) -> str:
    """`nvmeX:nY[pZ]` → the block device's path; anything else is returned as it is."""
    match = HOST_NVME.match(text)
    if match is None:
        return text
    ctrl, nsid, part = match[1], int(match[2]), match[3]
    ctrl_dir = sysfs / "class" / "nvme" / ctrl
    if not ctrl_dir.is_dir():
        have = sorted(p.name for p in (sysfs / "class" / "nvme").glob("nvme*"))
        raise ConfigError(f"{text}: no host NVMe controller {ctrl} (have: {_names(have)})")
    disks: dict[int, tuple[str, Path]] = {}
    for child in sorted(ctrl_dir.iterdir()):
        if not _NAMESPACE_DISK.match(child.name) or not child.is_dir():
            continue
        # The nsid attribute is the NSID; the name's number is only the kernel's counter.
        number = _read_int(child / "nsid")
        if number is None:
            number = int(child.name.rsplit("n", 1)[1])
        # Multipath: the disk the host opens is the subsystem's head, nvme0n1.
        disks.setdefault(number, (re.sub(r"c\d+(?=n\d+$)", "", child.name), child))
    if nsid not in disks:
        have = [f"n{n}" for n in sorted(disks)]
        raise ConfigError(f"{text}: {ctrl} has no namespace {nsid} (has: {_names(have)})")
    name, ns_dir = disks[nsid]
    if part is not None:
        wanted = f"{name}p{part}"
        found = {p.name for p in ns_dir.glob(f"{name}p*")}
        found |= {p.name for p in (sysfs / "class" / "block").glob(f"{name}p*")}
        if wanted not in found:
            raise ConfigError(
                f"{text}: {name} has no partition {part} (has: {_names(sorted(found))})"
            )
        name = wanted
    return str(dev / name)


_NVME_NAMESPACE = re.compile(r"^nvme\d+n\d+$")
_NVME_PARTITION = re.compile(r"^nvme\d+n\d+p\d+$")
_NG_NAME = re.compile(r"^ng\d+n\d+$")


def resolve_passthrough(
    text: str, sysfs: Path = Path("/sys"), dev: Path = Path("/dev")
) -> tuple[str, str | None]:
    """A passthrough namespace's path (/dev/ngXnY, /dev/nvmeXnY, nvmeX:nY) → its
    generic character device, and the namespace's block device (None: it has none,
    as a namespace in a format the block layer does not take)."""
    match = HOST_NVME.match(text)
    if match is not None and match[3] is not None:
        raise ConfigError(
            f"{text}: a partition has no ng device; passthrough takes a whole namespace "
            f"({match[1]}:n{match[2]})"
        )
    path = resolve_host_nvme(text, sysfs, dev)
    name = Path(os.path.realpath(path)).name
    if _NVME_PARTITION.match(name):
        raise ConfigError(
            f"{text}: a partition has no ng device; passthrough takes a whole namespace"
        )
    if _NVME_NAMESPACE.match(name):
        name = ng_name_for(name)
    elif not _NG_NAME.match(name):
        raise ConfigError(
            f"{text}: passthrough takes a host NVMe namespace: /dev/ngXnY, /dev/nvmeXnY or nvmeX:nY"
        )
    ng = dev / name
    if not ng.exists():
        raise ConfigError(f"{text}: no {ng} (NVMe generic devices need Linux 5.13 or later)")
    block = dev / block_name_for(name)
    return str(ng), str(block) if block.exists() else None


def _names(names: list[str]) -> str:
    return ", ".join(names) or "none"


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _read_rdev(path: Path) -> int | None:
    """A sysfs `dev` file ('7:0') as a device number."""
    try:
        major, minor = path.read_text().strip().split(":")
        return os.makedev(int(major), int(minor))
    except (OSError, ValueError):
        return None


def _devname(rdev: int) -> str:
    return f"{os.major(rdev)}:{os.minor(rdev)}"


def human(n: int) -> str:
    for unit, shift in (("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift and n % (1 << (shift - 10)) == 0:
            return f"{n / (1 << shift):g} {unit}"
    return f"{n} B"


@dataclass(frozen=True)
class Partition:
    name: str
    rdev: int
    start: int  # bytes into the disk
    size: int


@dataclass(frozen=True)
class BlockDevice:
    """A block device as sysfs describes it: a whole disk or one of its partitions."""

    name: str
    rdev: int
    disk_name: str
    disk_rdev: int
    start: int  # bytes into the whole disk (0 for the disk itself)
    partitions: tuple[Partition, ...]  # the whole disk's
    holders: tuple[str, ...]  # device-mapper, RAID... built on top of it

    @property
    def is_partition(self) -> bool:
        return self.rdev != self.disk_rdev

    @classmethod
    def from_sysfs(cls, rdev: int, path: str, sysfs: Path) -> BlockDevice:
        entry = sysfs / "dev" / "block" / _devname(rdev)
        try:
            node = entry.resolve(strict=True)
        except OSError:
            # No sysfs entry: take it as a disk of its own, with nothing known on top.
            name = Path(path).name
            return cls(name, rdev, name, rdev, 0, (), ())
        holders = tuple(sorted(p.name for p in (node / "holders").glob("*")))
        if (node / "partition").exists():
            disk = node.parent
            start = (_read_int(node / "start") or 0) * SECTOR
            disk_rdev = _read_rdev(disk / "dev") or rdev
            return cls(node.name, rdev, disk.name, disk_rdev, start, _partitions(disk), holders)
        return cls(node.name, rdev, node.name, rdev, 0, _partitions(node), holders)


def _partitions(disk: Path) -> tuple[Partition, ...]:
    found = []
    for child in sorted(disk.iterdir()):
        if not (child / "partition").exists():
            continue
        rdev = _read_rdev(child / "dev")
        start, size = _read_int(child / "start"), _read_int(child / "size")
        if rdev is not None and start is not None and size is not None:
            found.append(Partition(child.name, rdev, start * SECTOR, size * SECTOR))
    return tuple(found)


@dataclass(frozen=True)
class Mount:
    rdev: int
    mountpoint: str
    source: str


def read_mounts(path: str = "/proc/self/mountinfo") -> list[Mount]:
    """The mount table (proc(5) mountinfo): the device number and mount point of each."""
    mounts = []
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    for line in lines:
        fields = line.split(" ")
        try:
            major, minor = fields[2].split(":")
            sep = fields.index("-", 6)
            source = _unescape(fields[sep + 2])
        except (IndexError, ValueError):
            continue
        rdev = os.makedev(int(major), int(minor))
        mounts.append(Mount(rdev, _unescape(fields[4]), source))
    return mounts


def _unescape(text: str) -> str:
    """mountinfo writes space, tab, newline and backslash as octal escapes."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), text)


@dataclass(frozen=True)
class Extent:
    """Bytes [start, end) of one store: ('file', st_dev, st_ino), ('disk', major, minor)
    or ('rbd', fsid, pool id, image id)."""

    store: tuple[str | int, ...]
    name: str  # the store, for messages
    start: int
    end: int

    def overlaps(self, other: Extent) -> bool:
        return self.store == other.store and self.start < other.end and other.start < self.end

    def span(self) -> str:
        return f"bytes {human(self.start)}..{human(self.end)}"

    def __str__(self) -> str:
        return f"{self.name} {self.span()}"

    def as_dict(self) -> dict[str, object]:
        return {"store": self.name, "start": self.start, "end": self.end}


class WriterLock:
    """An OFD lock (fcntl F_OFD_SETLK) that marks bytes of a file as written by a
    namespace, seen by every process that honours it (other nvme-mdev processes).

    Readers may share anything and two writers nothing, so the lock cannot sit on the
    bytes themselves (a write lock there would also exclude readers): it sits on their
    image in a lane far past any real data, WRITER_LANE + [start, end), where only
    writers take locks. Open file description locks, unlike POSIX record locks, belong
    to this descriptor alone: closing another descriptor of the file in this process
    keeps them, and the lock goes away with the descriptor (also if the process dies).
    """

    #: 2^62: beyond any file's size (off_t is 63 bits), room for any offset in it
    WRITER_LANE = 1 << 62
    _FLOCK = struct.Struct("hhqqi4x")  # struct flock on Linux/LP64: type, whence, start, len, pid

    def __init__(self, path: str, label: str, start: int, end: int, owner: str = "") -> None:
        # A write lock needs a writer. Keyed by its namespace (`owner`): a successor
        # process takes over this very description, and with it the lock.
        self._fd = descriptors.open_fd(path, os.O_RDWR | os.O_CLOEXEC, f"writer {owner}")
        self._label = label
        try:
            self.set(start, end)
        except BaseException:
            descriptors.close_fd(self._fd)
            raise

    def set(self, start: int, end: int) -> None:
        """Hold exactly [start, end); Conflict if another process writes any of it."""
        lane = self.WRITER_LANE
        if end > start:  # (a length of 0 would mean "to the end of all offsets")
            try:
                # Lock the new range first: a refused growth keeps the old lock whole.
                self._lock(fcntl.F_WRLCK, lane + start, end - start)
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise ConfigError(f"{self._label}: cannot lock: {exc.strerror}") from exc
                raise Conflict(
                    f"{self._label}: bytes {human(start)}..{human(end)} are written by a "
                    "namespace of another nvme-mdev process; two writable namespaces may "
                    "not share bytes (make one read-only, or move a window)"
                ) from exc
        self._lock(fcntl.F_UNLCK, lane + max(start, end), 0)  # what a shrink gave up

    def _lock(self, kind: int, start: int, length: int) -> None:
        flock = self._FLOCK.pack(kind, os.SEEK_SET, start, length, 0)
        fcntl.fcntl(self._fd, fcntl.F_OFD_SETLK, flock)

    def close(self) -> None:
        descriptors.close_fd(self._fd)  # the lock goes with its open file description


@dataclass
class _Use:
    extent: Extent
    writable: bool
    owner: str
    #: other processes' view of this writable file namespace (None: a disk, or read-only)
    lock: WriterLock | None = None


@dataclass
class _Hold:
    """An exclusive claim (an O_EXCL descriptor) on a block device, shared by count."""

    fd: int
    name: str
    disk_rdev: int
    count: int = 1


class Lease:
    """What one namespace holds of the host's storage; `release` after closing it."""

    def __init__(
        self,
        storage: HostStorage,
        path: str,
        extent: Extent | None,
        use: _Use | None,
        hold: int | None,
    ) -> None:
        self._storage = storage
        #: the store, resolved ('nvme0:n1p3' → /dev/nvme0n1p3)
        self.path = path
        self.extent = extent
        self._use = use
        self._hold = hold
        self._released = False

    def resize(self, size: int, label: str) -> None:
        """The namespace's store now gives it `size` bytes (a rescan). Growing into bytes
        another writable namespace uses is refused (Conflict); the extent is unchanged."""
        self._storage._resize(self, size, label)

    def replaced(self) -> str | None:
        """Whether the path no longer names the store the namespace uses (a file
        unlinked, or replaced): the namespace keeps using what it opened."""
        if self.extent is None or self.extent.store[0] != "file":
            return None
        try:
            st = os.stat(self.path)
        except OSError:
            return f"{self.path} was unlinked; the namespace still uses the open file"
        if ("file", st.st_dev, st.st_ino) != self.extent.store:
            return f"{self.path} now names another file; the namespace still uses the old one"
        return None

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._storage._release(self._use, self._hold)


class HostStorage:
    def __init__(
        self,
        sysfs: str | Path = "/sys",
        dev: str | Path = "/dev",
        mountinfo: str = "/proc/self/mountinfo",
    ) -> None:
        self.sysfs = Path(sysfs)
        self.dev = Path(dev)
        self.mountinfo = mountinfo
        # Namespaces are added from control connections in parallel: check-and-claim
        # must be one step.
        self._lock = threading.Lock()
        self._uses: list[_Use] = []
        self._holds: dict[int, _Hold] = {}  # block device number → its claim

    def open(self, spec: NamespaceSpec, nsid: int, owner: str) -> tuple[Namespace, Lease]:
        """The namespace for `spec`, after every sharing check; `owner` names it in
        the errors other namespaces get ('controller vm1 nsid 2')."""
        with self._lock:
            return self._open(spec, nsid, owner)

    def uses(self) -> list[tuple[str, Extent, bool]]:
        with self._lock:
            return [(u.owner, u.extent, u.writable) for u in self._uses]

    def _open(self, spec: NamespaceSpec, nsid: int, owner: str) -> tuple[Namespace, Lease]:
        if spec.is_null:
            return spec.open(nsid), Lease(self, spec.path, None, None, None)
        if spec.passthrough:
            return self._open_passthrough(spec, nsid, owner)
        if spec.is_rbd:
            return self._open_rbd(spec, nsid, owner)
        path = resolve_host_nvme(spec.path, self.sysfs, self.dev)
        label = spec.path if path == spec.path else f"{spec.path} ({path})"
        try:
            st = os.stat(path)
        except OSError as exc:
            raise ConfigError(f"{label}: {exc.strerror}") from exc
        try:
            # Never O_EXCL here: the claim is taken below, once per disk, so that
            # several namespaces can share a disk through windows.
            backend: Backend = FileBackend(
                path, readonly=spec.readonly, exclusive=False, direct=spec.direct
            )
            if spec.windowed:
                backend = window(backend, spec.offset, spec.size)
        except BackendError as exc:
            raise ConfigError(str(exc) if label == path else f"{spec.path}: {exc}") from exc
        try:
            extent, device = self.locate(path, st, spec.offset, backend.size)
            writable = not (spec.readonly or backend.readonly)
            self.check_overlap(label, extent, writable)
            if not spec.force and (users := self.host_users(path, st, device, extent)):
                raise Busy(
                    f"{label}: in use by the host: {'; '.join(users)} (add force to share it)"
                )
            lock = None
            if device is None and writable:
                lock = WriterLock(path, label, extent.start, extent.end, owner)
            hold = None
            if device is not None:
                if spec.force:
                    log.warning("%s: shared without an exclusive claim (force)", label)
                else:
                    hold = self._claim(label, path, device)
        except ConfigError:
            backend.close()
            raise
        try:
            ns = make_namespace(nsid, backend, spec)
        except ConfigError:
            if lock is not None:
                lock.close()
            if hold is not None:
                self._release_locked(None, hold)
            raise
        use = _Use(extent, writable, owner, lock)
        self._uses.append(use)
        return ns, Lease(self, path, extent, use, hold)

    def _open_passthrough(
        self, spec: NamespaceSpec, nsid: int, owner: str
    ) -> tuple[Namespace, Lease]:
        """A whole host NVMe namespace through its ng device. The sharing rules are its
        block device's: the bytes are the same, so the host must not use them (mounted,
        held) and its block device is claimed exclusively, as for any disk."""
        ng, block = resolve_passthrough(spec.path, self.sysfs, self.dev)
        label = spec.path if ng == spec.path else f"{spec.path} ({ng})"
        try:
            backend = PassthroughBackend(ng, readonly=spec.readonly, sysfs=self.sysfs)
        except BackendError as exc:
            raise ConfigError(str(exc) if label == ng else f"{spec.path}: {exc}") from exc
        hold = None
        try:
            writable = not (spec.readonly or backend.readonly)
            device = None
            if block is not None:
                st = os.stat(block)
                extent, device = self.locate(block, st, 0, backend.size)
            else:
                rdev = os.stat(ng).st_rdev
                extent = Extent(("ng", os.major(rdev), os.minor(rdev)), ng, 0, backend.size)
            self.check_overlap(label, extent, writable)
            if device is not None and block is not None:
                if not spec.force and (users := self.host_users(block, st, device, extent)):
                    raise Busy(
                        f"{label}: in use by the host: {'; '.join(users)} (add force to share it)"
                    )
                if spec.force:
                    log.warning("%s: passed through without an exclusive claim (force)", label)
                else:
                    hold = self._claim(label, block, device)
            ns = make_namespace(nsid, backend, spec)
        except ConfigError:
            backend.close()
            if hold is not None:
                self._release_locked(None, hold)
            raise
        use = _Use(extent, writable, owner)
        self._uses.append(use)
        return ns, Lease(self, ng, extent, use, hold)

    def _open_rbd(self, spec: NamespaceSpec, nsid: int, owner: str) -> tuple[Namespace, Lease]:
        """An RBD image, whole. Within this process the sharing rule is every store's (the
        image is compared by its ids, so two spellings of one image meet); across
        processes and hosts, a writable one takes the image's exclusive lock."""
        backend = spec.open_rbd()
        try:
            extent = Extent(backend.store_key(), backend.description, 0, backend.size)
            self.check_overlap(spec.path, extent, not backend.readonly)
        except ConfigError:
            backend.close()
            raise
        spec.lock_rbd(backend)  # (closes it if it fails)
        ns = make_namespace(nsid, backend, spec)
        use = _Use(extent, not backend.readonly, owner)
        self._uses.append(use)
        return ns, Lease(self, backend.description, extent, use, None)

    def locate(
        self, path: str, st: os.stat_result, offset: int, size: int
    ) -> tuple[Extent, BlockDevice | None]:
        """Where `size` bytes from `offset` of `path` (stat `st`) really are."""
        if not stat.S_ISBLK(st.st_mode):
            store = ("file", st.st_dev, st.st_ino)
            return Extent(store, os.path.abspath(path), offset, offset + size), None
        device = BlockDevice.from_sysfs(st.st_rdev, path, self.sysfs)
        start = device.start + offset
        disk = ("disk", os.major(device.disk_rdev), os.minor(device.disk_rdev))
        return Extent(disk, str(self.dev / device.disk_name), start, start + size), device

    def _resize(self, lease: Lease, size: int, label: str) -> None:
        with self._lock:
            use = lease._use
            if use is None:
                return
            old = use.extent
            extent = dataclasses.replace(old, end=old.start + size)
            for other in self._uses:
                if (
                    other is not use
                    and use.writable
                    and other.writable
                    and other.extent.overlaps(extent)
                ):
                    raise Conflict(
                        f"{label}: growing to {human(size)} ({extent.span()} of {extent.name}) "
                        f"would overlap {other.owner} ({other.extent.span()}); it keeps "
                        f"{human(old.end - old.start)} (shrink or move the other first)"
                    )
            if use.lock is not None:
                use.lock.set(extent.start, extent.end)  # Conflict: another process's bytes
            use.extent = extent
            lease.extent = extent

    def check_overlap(self, label: str, extent: Extent, writable: bool) -> None:
        """Conflict if a writable `extent` overlaps a writable one in use."""
        for use in self._uses:
            # Readers may share anything; two writers may share nothing.
            if writable and use.writable and use.extent.overlaps(extent):
                mine = extent.span() if label == extent.name else str(extent)
                raise Conflict(
                    f"{label}: {mine} overlap {use.owner} ({use.extent.span()}); two "
                    "writable namespaces may not share bytes (make one read-only, or move "
                    "a window)"
                )

    def host_users(
        self, path: str, st: os.stat_result, device: BlockDevice | None, extent: Extent
    ) -> list[str]:
        """How the host uses the bytes of `extent` (empty: it does not, as far as the
        mount table, sysfs holders and loop devices tell)."""
        users: list[str] = []
        if device is None:
            users += [f"loop device {d} is backed by it" for d in self._loops_over(st)]
        else:
            mounts = read_mounts(self.mountinfo)
            real = os.path.realpath(path)

            def mounted(rdev: int, node: str) -> list[str]:
                return [m.mountpoint for m in mounts if m.rdev == rdev or m.source == node]

            users += [f"mounted at {mp}" for mp in mounted(device.rdev, real)]
            if device.holders:
                users.append(f"held by {', '.join(device.holders)}")
            if device.is_partition:
                disk_node = str(self.dev / device.disk_name)
                users += [
                    f"its disk {device.disk_name} is mounted at {mp}"
                    for mp in mounted(device.disk_rdev, disk_node)
                ]
            else:
                for p in device.partitions:
                    if p.start < extent.end - device.start and extent.start < p.start + p.size:
                        node = str(self.dev / p.name)
                        where = f"partition {p.name} ({human(p.start)}..{human(p.start + p.size)})"
                        users += [f"{where} is mounted at {mp}" for mp in mounted(p.rdev, node)]
                        if holders := sorted(x.name for x in self._holders_of(p.rdev)):
                            users.append(f"{where} is held by {', '.join(holders)}")
        return users

    def _holders_of(self, rdev: int) -> list[Path]:
        return list((self.sysfs / "dev" / "block" / _devname(rdev) / "holders").glob("*"))

    def _loops_over(self, st: os.stat_result) -> list[str]:
        found = []
        for backing in sorted((self.sysfs / "block").glob("loop*/loop/backing_file")):
            try:
                name = backing.read_text().strip().removesuffix(" (deleted)")
                other = os.stat(name)
            except OSError:
                continue
            if (other.st_dev, other.st_ino) == (st.st_dev, st.st_ino):
                found.append(str(self.dev / backing.parent.parent.name))
        return found

    def _claim(self, label: str, path: str, device: BlockDevice) -> int:
        """Hold `device` exclusively (or count on a claim we hold on it or its disk)."""
        for key in (device.rdev, device.disk_rdev):
            # Our claim on the whole disk already keeps everyone else off its partitions.
            if key in self._holds:
                self._holds[key].count += 1
                return key
        try:
            fd = descriptors.open_fd(path, os.O_RDONLY | os.O_EXCL | os.O_CLOEXEC)
        except OSError as exc:
            if exc.errno != errno.EBUSY:
                raise ConfigError(f"{label}: {exc.strerror}") from exc
            raise Busy(f"{label}: {self._busy_reason(device)}") from exc
        self._holds[device.rdev] = _Hold(fd, device.name, device.disk_rdev)
        return device.rdev

    def _busy_reason(self, device: BlockDevice) -> str:
        if not device.is_partition:
            ours = sorted(h.name for h in self._holds.values() if h.disk_rdev == device.rdev)
            if ours:
                # The kernel lets nobody claim a disk whose partitions are claimed.
                return (
                    f"busy: this process already uses its partition(s) {', '.join(ours)}; "
                    "use partitions or windows of the disk, not both (or add force)"
                )
            mounts = read_mounts(self.mountinfo)
            in_use = [
                f"{p.name} mounted at {m.mountpoint}"
                for p in device.partitions
                for m in mounts
                if m.rdev == p.rdev
            ]
            if in_use:
                return (
                    "busy: the kernel gives nobody the whole disk while a partition of it "
                    f"is in use ({'; '.join(in_use)}): use a partition, or add force"
                )
        return (
            "busy: another program holds it (a filesystem, swap, device-mapper, RAID or "
            "an exclusive open); add force to share it anyway"
        )

    def _release(self, use: _Use | None, hold: int | None) -> None:
        with self._lock:
            self._release_locked(use, hold)

    def _release_locked(self, use: _Use | None, hold: int | None) -> None:
        if use is not None and use in self._uses:
            self._uses.remove(use)
            if use.lock is not None:
                use.lock.close()
        if hold is not None and hold in self._holds:
            claim = self._holds[hold]
            claim.count -= 1
            if claim.count == 0:
                descriptors.close_fd(claim.fd)
                del self._holds[hold]
