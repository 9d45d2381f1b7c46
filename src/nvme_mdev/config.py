"""Namespace specifications as users write them, checked before anything opens.

A spec is a path with optional comma-separated options:
    disk.img              a regular file (a disk image)
    /dev/sdb2,ro          a block device or partition, read-only
    big.img,bs=4096       4 KiB logical blocks
    null:1G               no storage (benchmarks): reads leave the buffer, writes vanish
    disk.img,offset=1G,size=2G   a window: 2 GiB from 1 GiB into the file (or device)
    nvme0:n1p3            partition 3 of namespace 1 of host controller nvme0 (sysfs)
    /dev/sdb3,force       share a partition the host uses (mounted, held): at your risk
    /dev/ng0n1            NVMe passthrough to host namespace 1 of nvme0: the guest's
                          commands go to the host's controller (whole namespaces only;
                          the LBA format is the host's)
    nvme0:n1,passthrough  the same, named as above (so is /dev/nvme0n1,passthrough)
    rbd:POOL/IMAGE        a Ceph RBD image (backends/rbd.py), with its exclusive lock;
                          options: conf=FILE (default /etc/ceph/ceph.conf), id=CLIENT
                          (admin), keyring=FILE, create=SIZE (make it first),
                          clone=POOL/IMAGE@SNAP (make it a copy-on-write clone of that
                          snapshot first), break-lock (take the lock from a dead holder)
    rbd:POOL/IMAGE@SNAP   a snapshot of one: always read-only
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from .backends.base import Backend
from .backends.file import BackendError, FileBackend, NullBackend
from .backends.passthrough import PassthroughBackend
from .backends.rbd import DEFAULT_CLIENT_ID, Connection, RbdBackend, RbdImage
from .backends.window import WindowBackend
from .nvme.namespace import SUPPORTED_BLOCK_SIZES, Namespace


class ConfigError(Exception):
    """A configuration mistake; the message says what to fix, on one line."""


_SIZE = re.compile(r"^(\d+)([KMGT]?)i?B?$", re.IGNORECASE)
#: the largest byte count or offset anything here takes: a file offset (off_t) is a
#: signed 64-bit number, and so are the data plane's byte offsets (base + LBA << shift).
#: A namespace of that many bytes has fewer than 2^64 blocks: NSZE/NCAP/NUSE fit.
MAX_BYTES = (1 << 63) - 1
_AT_MOST = f"give at most {MAX_BYTES >> 40}T (2^63 - 1 bytes: the largest file offset)"
#: the highest CPU number taken (Linux's NR_CPUS is at most 8192); a bound, so that
#: '0-99999999999' is refused and not turned into a set of a hundred billion numbers
MAX_CPU = 8191
#: an NVMe namespace's generic character device: always a passthrough namespace
NG_DEVICE = re.compile(r"^(?:/dev/)?ng\d+n\d+$")


def parse_size(text: str) -> int:
    match = _SIZE.match(text.strip())
    if not match:
        raise ConfigError(f"{_clip(text)}: not a size (examples: 512M, 4G, 1073741824)")
    digits, unit = match.groups()
    digits = digits.lstrip("0") or "0"
    shift = 10 * ("KMGT".find(unit.upper()) + 1) if unit else 0
    # (the digit count first: int() of thousands of digits is refused, or slow)
    if len(digits) > 19 or int(digits) << shift > MAX_BYTES:
        raise ConfigError(f"{_clip(text)}: too large; {_AT_MOST}")
    return int(digits) << shift


def _clip(text: str) -> str:
    """`text` for an error message, cut short if it is long."""
    return repr(text) if len(text) <= 40 else repr(text[:40]) + "..."


def size_text(n: int) -> str:
    """A byte count as parse_size reads it back, shortest exact form: 1G, 4K, 1000."""
    for unit in "TGMK":
        shift = 10 * ("KMGT".index(unit) + 1)
        if n and n % (1 << shift) == 0:
            return f"{n >> shift}{unit}"
    return str(n)


def parse_cpu_list(text: str) -> set[int]:
    """'3', '2,5', '0-3' → a set of CPU numbers."""
    cpus: set[int] = set()
    try:
        for part in text.split(","):
            first, _, last = part.partition("-")
            low, high = int(first), int(last or first)
            if high > MAX_CPU:
                raise ConfigError(f"{_clip(text)}: CPU {high}: CPUs are numbered 0..{MAX_CPU}")
            cpus.update(range(low, high + 1))
    except ValueError:
        raise ConfigError(f"{_clip(text)}: expected CPUs like 3, 2,5 or 0-3") from None
    if not cpus or min(cpus) < 0:
        raise ConfigError(f"{_clip(text)}: expected CPUs like 3, 2,5 or 0-3")
    return cpus


#: what an `rbd:` path starts with
RBD_PREFIX = "rbd:"
RBD_FORM = "rbd:POOL/IMAGE[@SNAP]"
_RBD_KNOWN = (
    "known for rbd: ro, bs=512|4096, conf=FILE, id=CLIENT, keyring=FILE, create=SIZE, "
    "clone=POOL/IMAGE@SNAP, break-lock"
)
#: the options only an rbd: namespace takes
_RBD_KEYS = frozenset(("conf", "id", "keyring", "create", "clone", "break-lock"))


@dataclass(frozen=True)
class RbdOptions:
    """How an `rbd:` namespace reaches its cluster, and what it makes there first."""

    #: ceph.conf (None: librados' search: $CEPH_CONF, /etc/ceph/ceph.conf, ...)
    conf: str | None = None
    #: the client id, 'admin' for client.admin (None: admin)
    client_id: str | None = None
    #: the client's keyring (None: the conf's, or /etc/ceph/ceph.client.ID.keyring)
    keyring: str | None = None
    #: make the image first, this many bytes (refused if it exists)
    create: int | None = None
    #: make the image first as a copy-on-write clone of this snapshot, POOL/IMAGE@SNAP
    clone: str | None = None
    #: take the exclusive lock from a holder that is dead (blocklisting it)
    break_lock: bool = False

    @property
    def connection(self) -> Connection:
        return Connection(self.conf, self.client_id or DEFAULT_CLIENT_ID, self.keyring)


@dataclass(frozen=True)
class NamespaceSpec:
    path: str
    readonly: bool = False
    block_size: int = 512
    #: a window of the backing store: `size` bytes (None: to the end) from `offset`
    offset: int = 0
    size: int | None = None
    #: use storage the host is using (mounted, held by another program)
    force: bool = False
    #: O_DIRECT for the I/O engine's aligned transfers: None is the default (block
    #: devices yes, files no), True/False what `direct=on|off` asked for
    direct: bool | None = None
    #: NVMe passthrough to a whole host namespace (backends/passthrough.py)
    passthrough: bool = False
    #: an `rbd:` namespace's cluster and what to make there (None: the defaults)
    rbd: RbdOptions | None = None

    @classmethod
    def parse(cls, text: str, block_size: int = 512, readonly: bool = False) -> NamespaceSpec:
        path, *options = text.split(",")
        if not path:
            raise ConfigError(f"{text!r}: empty path")
        offset, size, force = 0, None, False
        direct: bool | None = None
        passthrough = bool(NG_DEVICE.match(path))
        is_rbd = path.startswith(RBD_PREFIX)
        rbd: dict[str, Any] = {}
        if is_rbd and "@" in path:
            readonly = True  # a snapshot
        for option in options:
            key, _, value = option.partition("=")
            if key in _RBD_KEYS:
                if not is_rbd:
                    raise ConfigError(f"{text!r}: {key} is an option of {RBD_FORM} namespaces only")
                rbd.update(_rbd_option(text, option, key, value))
            elif key == "ro" and not value:
                readonly = True
            elif key == "force" and not value:
                force = True
            elif key == "passthrough" and not value:
                passthrough = True
            # (ASCII digits, and not thousands of them: int() refuses both "²" and those)
            elif key == "bs" and value.isascii() and value.isdigit() and len(value) <= 20:
                block_size = int(value)
                if passthrough or "passthrough" in options:
                    raise ConfigError(
                        f"{text!r}: a passthrough namespace has the host's LBA format; "
                        "leave out bs="
                    )
            elif key == "offset" and value:
                offset = parse_size(value)
            elif key in ("size", "length") and value:
                size = parse_size(value)
            elif key == "direct" and value in ("on", "off"):
                direct = value == "on"
            else:
                known = (
                    _RBD_KNOWN
                    if is_rbd
                    else "known: ro, bs=512|4096, offset=SIZE, size=SIZE, force, direct=on|off, "
                    f"passthrough; for {RBD_FORM}: conf=, id=, keyring=, create=, clone=, "
                    "break-lock"
                )
                raise ConfigError(f"{text!r}: unknown option {option!r} ({known})")
        spec = cls(
            path,
            readonly,
            block_size,
            offset,
            size,
            force,
            direct,
            passthrough,
            RbdOptions(**rbd) if is_rbd else None,
        )
        return spec.checked(text)

    def checked(self, text: str | None = None) -> NamespaceSpec:
        """Self, if its fields agree; ConfigError naming `text` (or the path) if not."""
        name = repr(text) if text is not None else self.path
        if self.block_size not in SUPPORTED_BLOCK_SIZES:
            raise ConfigError(f"{name}: block size {self.block_size}; use 512 or 4096")
        if self.offset < 0 or (self.size is not None and self.size <= 0):
            raise ConfigError(f"{name}: a window needs offset >= 0 and size > 0")
        if self.offset + (self.size or 0) > MAX_BYTES:
            # (the numbers are left out: from JSON they can have thousands of digits)
            raise ConfigError(f"{name}: the window's offset + size is too large; {_AT_MOST}")
        if self.is_null:
            self.null_size(name)  # a null:SIZE that does not read is refused now, not at open
        if self.offset % self.block_size:
            raise ConfigError(
                f"{name}: offset {self.offset} is not a multiple of the {self.block_size}-byte "
                "block size"
            )
        if self.is_null and self.windowed:
            raise ConfigError(f"{name}: a null namespace has no window (give null:SIZE)")
        if self.passthrough and (self.windowed or self.is_null):
            raise ConfigError(
                f"{name}: passthrough takes a whole host NVMe namespace, not a window"
            )
        if self.is_rbd:
            self._check_rbd(name)
        elif self.rbd is not None:
            raise ConfigError(
                f"{name}: conf=, id=, keyring=, create=, clone= and break-lock "
                f"are options of {RBD_FORM} namespaces only"
            )
        return self

    def _check_rbd(self, name: str) -> None:
        image = self.rbd_image(name)
        not_taken = [
            what
            for what, given in (
                ("offset=/size=", self.windowed),
                ("force", self.force),
                ("direct=", self.direct is not None),
                ("passthrough", self.passthrough),
            )
            if given
        ]
        if not_taken:
            raise ConfigError(
                f"{name}: an rbd namespace is a whole image; leave out {not_taken[0]} "
                f"({_RBD_KNOWN})"
            )
        options = self.rbd_options
        made = "create=" if options.create is not None else "clone=" if options.clone else None
        if options.create is not None and options.clone:
            raise ConfigError(f"{name}: give create=SIZE or clone=POOL/IMAGE@SNAP, not both")
        if made and image.snapshot is not None:
            raise ConfigError(f"{name}: {made} makes an image, not a snapshot (drop the @SNAP)")
        if made and self.readonly:
            raise ConfigError(f"{name}: {made} makes a new image to write; leave out ro")
        if options.break_lock and self.readonly:
            raise ConfigError(
                f"{name}: break-lock takes the lock a writable namespace needs; a read-only "
                "one takes none (leave out break-lock)"
            )
        if options.create is not None and options.create < self.block_size:
            raise ConfigError(
                f"{name}: create={options.create}: smaller than one {self.block_size}-byte block"
            )
        if options.clone:
            self.rbd_clone(name)
        for what, value in (
            ("conf", options.conf),
            ("id", options.client_id),
            ("keyring", options.keyring),
        ):
            if value is not None and not value:
                raise ConfigError(f"{name}: {what}= needs a value")

    @property
    def is_rbd(self) -> bool:
        return self.path.startswith(RBD_PREFIX)

    @property
    def rbd_options(self) -> RbdOptions:
        return self.rbd or RbdOptions()

    def rbd_image(self, name: str | None = None) -> RbdImage:
        """The image (or snapshot) an `rbd:` path names."""
        try:
            return RbdImage.parse(self.path[len(RBD_PREFIX) :])
        except ValueError as exc:
            raise ConfigError(f"{name or _clip(self.path)}: {exc} (write {RBD_FORM})") from None

    def rbd_clone(self, name: str | None = None) -> RbdImage | None:
        """The snapshot `clone=` names (None: no clone=)."""
        text = self.rbd_options.clone
        if not text:
            return None
        try:
            parent = RbdImage.parse(text)
        except ValueError as exc:
            parent = None
            why = str(exc)
        else:
            why = "a clone is made from a snapshot"
        if parent is None or parent.snapshot is None:
            raise ConfigError(
                f"{name or _clip(self.path)}: clone={text}: {why} (write clone=POOL/IMAGE@SNAP)"
            )
        return parent

    def open_rbd(self) -> RbdBackend:
        """The `rbd:` namespace's image, opened (made first if create= or clone= says
        so), its lock not yet taken (RbdBackend.lock)."""
        options = self.rbd_options
        try:
            return RbdBackend(
                self.rbd_image(),
                options.connection,
                readonly=self.readonly,
                create=options.create,
                clone=self.rbd_clone(),
            )
        except BackendError as exc:
            raise ConfigError(str(exc)) from exc

    def lock_rbd(self, backend: RbdBackend) -> None:
        """Take a writable `rbd:` namespace's exclusive lock (closing it if it cannot)."""
        try:
            backend.lock(self.rbd_options.break_lock)
        except BackendError as exc:
            backend.close()
            raise ConfigError(str(exc)) from exc

    @property
    def is_null(self) -> bool:
        return self.path.startswith("null:")

    def null_size(self, name: str | None = None) -> int:
        """The byte count of a `null:SIZE` namespace."""
        try:
            return parse_size(self.path[5:])
        except ConfigError as exc:
            raise ConfigError(f"{name or _clip(self.path)}: null:SIZE: {exc}") from None

    @property
    def windowed(self) -> bool:
        return self.offset != 0 or self.size is not None

    def text(self) -> str:
        """The spec as a user would write it (round-trips through parse)."""
        options = ["ro"] if self.readonly else []
        if self.block_size != 512:
            options.append(f"bs={self.block_size}")
        if self.offset:
            options.append(f"offset={size_text(self.offset)}")
        if self.size is not None:
            options.append(f"size={size_text(self.size)}")
        if self.force:
            options.append("force")
        if self.direct is not None:
            options.append(f"direct={'on' if self.direct else 'off'}")
        if self.passthrough:
            options = [o for o in options if not o.startswith("bs=")]  # the host's
            if not NG_DEVICE.match(self.path):
                options.append("passthrough")
        if self.rbd is not None:
            rbd = self.rbd
            for key, value in (
                ("conf", rbd.conf),
                ("id", rbd.client_id),
                ("keyring", rbd.keyring),
                ("create", size_text(rbd.create) if rbd.create is not None else None),
                ("clone", rbd.clone),
            ):
                if value is not None:
                    options.append(f"{key}={value}")
            if rbd.break_lock:
                options.append("break-lock")
        return ",".join([self.path, *options])

    def open(self, nsid: int) -> Namespace:
        """The namespace, with no sharing checks (see storage.HostStorage for those);
        a block device is opened exclusively."""
        backend: Backend
        if self.is_null:
            backend = NullBackend(self.null_size())
        elif self.is_rbd:
            rbd = self.open_rbd()
            self.lock_rbd(rbd)
            backend = rbd
        elif self.passthrough:
            from .storage import resolve_passthrough  # (storage imports this module)

            ng, _ = resolve_passthrough(self.path)
            try:
                backend = PassthroughBackend(ng, readonly=self.readonly)
            except BackendError as exc:
                raise ConfigError(str(exc)) from exc
        else:
            try:
                backend = FileBackend(self.path, readonly=self.readonly, direct=self.direct)
                if self.windowed:
                    backend = window(backend, self.offset, self.size)
            except BackendError as exc:
                raise ConfigError(str(exc)) from exc
        return make_namespace(nsid, backend, self)


def _rbd_option(text: str, option: str, key: str, value: str) -> dict[str, Any]:
    """One rbd-only option of spec `text` as RbdOptions' field and value."""
    if key == "break-lock":
        if value:
            raise ConfigError(f"{text!r}: {option!r}: break-lock takes no value")
        return {"break_lock": True}
    if not value:
        hint = {"conf": "FILE", "id": "CLIENT", "keyring": "FILE", "create": "SIZE"}.get(
            key, "POOL/IMAGE@SNAP"
        )
        raise ConfigError(f"{text!r}: {option!r}: give {key}={hint}")
    if key == "create":
        try:
            return {"create": parse_size(value)}
        except ConfigError as exc:
            raise ConfigError(f"{text!r}: create={exc}") from None
    return {{"id": "client_id"}.get(key, key): value}


def window(backend: Backend, offset: int, size: int | None) -> Backend:
    """`backend` cut to [offset, offset + size); closes it if the window does not fit."""
    try:
        if offset >= backend.size:
            raise BackendError(
                f"{backend.description}: offset {offset} is past the end ({backend.size} bytes)"
            )
        if size is None:
            return WindowBackend(backend, offset, backend.size - offset, to_end=True)
        return WindowBackend(backend, offset, size)
    except BackendError:
        backend.close()
        raise


def make_namespace(nsid: int, backend: Backend, spec: NamespaceSpec) -> Namespace:
    # A passthrough namespace's blocks are the host's (the guest's LBAs are its LBAs).
    block_size = backend.block_size if spec.passthrough else spec.block_size
    try:
        return Namespace(nsid, backend, block_size, spec.readonly)
    except ValueError as exc:
        backend.close()
        raise ConfigError(f"{spec.path}: {exc}") from exc


#: the longest poll timeout taken (an hour): the data planes hold it in 64-bit
#: nanoseconds, and a larger one would fail half way through making a controller
MAX_POLL_TIMEOUT_MS = 3_600_000
POLL_TIMEOUT_RANGE = f"0 or more, and at most {MAX_POLL_TIMEOUT_MS} (an hour)"
