"""Ceph RBD images as namespaces: librados and librbd through their C API (ctypes).

A namespace `rbd:POOL/IMAGE[@SNAP]` is one RBD image (or one of its snapshots, read
only). Each namespace has a cluster connection of its own (a `rados_t`), made from a
ceph.conf, a client id and a keyring, as the `rbd` command makes one. The libraries are
loaded when the first such namespace is opened: the package works without them.

Reads and writes go straight between the cluster and the guest's buffers (librbd's
vectored AIO calls, given the buffers' addresses). The native data plane makes those
calls itself (native/src/rbd.rs), many in flight, completed on librbd's threads into the
I/O thread's wake-up; what it leaves to Python (Dataset Management, Compare, Verify,
Copy) and the whole Python data plane come here: one command at a time on the thread
that runs it, which waits for librbd without holding Python's GIL (a read-only mapping
of guest memory is copied first).

Safety across hosts: a writable namespace takes the image's exclusive lock (the
`exclusive-lock` feature, on by default) explicitly, and keeps it: librbd then refuses
to hand it to anyone who asks, so a second opener, on this host or another, is refused
with the holder's name and address, at once. The lock goes when the namespace is
removed or the process stops (after a flush). A holder that still watches the image
(alive, hung, or dead less than its watch's timeout ago: 30 s) keeps it until
`break-lock`, which blocklists the holder, so that it can never write again, and takes
the lock; a holder that no longer does is dead, and librbd takes the lock from it
(blocklisting it) without being asked.

Losing the cluster: Ceph's clients wait for an unreachable cluster forever by default.
Here an operation that has had no answer in OP_TIMEOUT_S seconds fails with ETIMEDOUT,
which completes the guest's command with Namespace Not Ready, not Do Not Retry
(media_errors.UNREACHABLE): the guest retries, and once the cluster is back the same
namespace serves I/O again. Connecting gives up after CONNECT_TIMEOUT_S seconds. A
ceph.conf that sets `rados osd op timeout`, `rados mon op timeout` or `client mount
timeout` itself keeps its values.

librbd's own cache is turned off (`rbd cache = false`): a write has reached the OSDs
when its command completes, as the guest's Flush and FUA promise; the guest's page
cache is the cache.

A size change made on the cluster (`rbd resize`) reaches the namespace through a watch
on the image's header (`watch_size`); the daemon then rescans it and tells the guest.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .base import IoTarget
from .file import IOV_MAX, BackendError, EndOfStorage

log = logging.getLogger(__name__)

#: how long an operation waits for an unreachable cluster before it fails (seconds):
#: `rados osd op timeout` and `rados mon op timeout` (Ceph's default, 0, waits forever)
OP_TIMEOUT_S = 10
#: how long connecting waits for a monitor (seconds; Ceph's default: 300 s): less than
#: a control request's 10 s, so that an unreachable cluster is a one-line error there
CONNECT_TIMEOUT_S = 5
#: the options set, each where the conf leaves it at Ceph's default
_TIMEOUTS = {
    "rados_osd_op_timeout": ("0", OP_TIMEOUT_S),
    "rados_mon_op_timeout": ("0", OP_TIMEOUT_S),
    "client_mount_timeout": ("300", CONNECT_TIMEOUT_S),
}
#: the client id when the spec gives none (client.admin), as the rbd command's
DEFAULT_CLIENT_ID = "admin"
#: where the libraries are looked for: the sonames Debian's librados2 and librbd1 ship
LIBRARIES = {"rados": "librados.so.2", "rbd": "librbd.so.1"}
INSTALL_HINT = "librbd is not installed (Debian: apt-get install librbd1)"

RBD_LOCK_MODE_EXCLUSIVE = 0
RBD_FEATURE_EXCLUSIVE_LOCK = 1 << 2
#: a lock held by another client: what rbd_lock_acquire answers (EROFS: the holder,
#: asked, refused; EBUSY/EAGAIN on the way)
_LOCKED_ERRNOS = frozenset((errno.EROFS, errno.EBUSY, errno.EAGAIN))

_c_void_p = ctypes.c_void_p
_c_char_p = ctypes.c_char_p
_c_int = ctypes.c_int
_c_size_t = ctypes.c_size_t
_c_uint64 = ctypes.c_uint64
_c_char = ctypes.c_char
_addressof = ctypes.addressof
#: librbd's rbd_update_callback_t: void (*)(void *arg)
UPDATE_CALLBACK = ctypes.CFUNCTYPE(None, _c_void_p)


class _Watcher(ctypes.Structure):
    """rbd_image_watcher_t"""

    _fields_ = [("addr", _c_char_p), ("id", ctypes.c_int64), ("cookie", _c_uint64)]


def _holder(owner: str, watching: dict[str, int]) -> str:
    """A lock owner (its address) as a person reads it: 'client.4235 at ADDRESS'."""
    client = watching.get(owner)
    return f"client.{client} at {owner}" if client is not None else owner


@dataclass(frozen=True)
class RbdImage:
    """What `rbd:POOL/IMAGE[@SNAP]` names."""

    pool: str
    image: str
    snapshot: str | None = None

    @classmethod
    def parse(cls, text: str) -> RbdImage:
        """'POOL/IMAGE[@SNAP]' (ValueError, with what is wrong, if it is not one)."""
        pool, slash, rest = text.partition("/")
        image, at, snapshot = rest.partition("@")
        if not slash or not pool or not image:
            raise ValueError("expected POOL/IMAGE or POOL/IMAGE@SNAP")
        if "/" in image or "@" in snapshot:
            raise ValueError("a pool, image or snapshot name has no '/' or '@' in it")
        if at and not snapshot:
            raise ValueError("an empty snapshot name after '@'")
        return cls(pool, image, snapshot if at else None)

    def __str__(self) -> str:
        return f"{self.pool}/{self.image}" + (f"@{self.snapshot}" if self.snapshot else "")


@dataclass(frozen=True)
class Connection:
    """How to reach a cluster: a ceph.conf (None: librados' search: $CEPH_CONF,
    /etc/ceph/ceph.conf, ~/.ceph/config, ./ceph.conf), a client id (admin for
    client.admin), a keyring (None: the conf's, or librados' default places)."""

    conf: str | None = None
    client_id: str = DEFAULT_CLIENT_ID
    keyring: str | None = None


# --- the libraries ------------------------------------------------------------------

_libraries: tuple[ctypes.CDLL, ctypes.CDLL] | None = None
_load_lock = threading.Lock()


def _load() -> tuple[ctypes.CDLL, ctypes.CDLL]:
    """librados and librbd, their functions declared (BackendError if missing)."""
    global _libraries
    with _load_lock:
        if _libraries is None:
            rados, rbd = (_open_library(name, soname) for name, soname in LIBRARIES.items())
            _declare(rados, rbd)
            _libraries = (rados, rbd)
        return _libraries


def _open_library(name: str, soname: str) -> ctypes.CDLL:
    try:
        return ctypes.CDLL(soname, use_errno=True)
    except OSError:
        found = ctypes.util.find_library(name)
        if found is None:
            raise BackendError(INSTALL_HINT) from None
        try:
            return ctypes.CDLL(found, use_errno=True)
        except OSError as exc:
            raise BackendError(f"{INSTALL_HINT}: {exc}") from exc


def _declare(rados: ctypes.CDLL, rbd: ctypes.CDLL) -> None:
    P = ctypes.POINTER
    vp, cp, i, sz, u64 = _c_void_p, _c_char_p, _c_int, _c_size_t, _c_uint64
    signatures: dict[ctypes.CDLL, dict[str, tuple[object, list[object]]]] = {
        rados: {
            "rados_create": (i, [P(vp), cp]),
            "rados_conf_read_file": (i, [vp, cp]),
            "rados_conf_set": (i, [vp, cp, cp]),
            "rados_conf_get": (i, [vp, cp, vp, sz]),
            "rados_connect": (i, [vp]),
            "rados_shutdown": (None, [vp]),
            "rados_cluster_fsid": (i, [vp, vp, sz]),
            "rados_ioctx_create": (i, [vp, cp, P(vp)]),
            "rados_ioctx_destroy": (None, [vp]),
            "rados_ioctx_get_id": (ctypes.c_int64, [vp]),
        },
        rbd: {
            "rbd_open": (i, [vp, cp, P(vp), cp]),
            "rbd_open_read_only": (i, [vp, cp, P(vp), cp]),
            "rbd_close": (i, [vp]),
            "rbd_get_size": (i, [vp, P(u64)]),
            "rbd_get_id": (i, [vp, vp, sz]),
            "rbd_get_features": (i, [vp, P(u64)]),
            "rbd_aio_create_completion": (i, [vp, vp, P(vp)]),
            "rbd_aio_readv": (i, [vp, vp, i, u64, vp]),
            "rbd_aio_writev": (i, [vp, vp, i, u64, vp]),
            "rbd_aio_wait_for_complete": (i, [vp]),
            "rbd_aio_get_return_value": (ctypes.c_ssize_t, [vp]),
            "rbd_aio_release": (None, [vp]),
            "rbd_flush": (i, [vp]),
            "rbd_write_zeroes": (ctypes.c_ssize_t, [vp, u64, sz, i, i]),
            "rbd_compare_and_write": (ctypes.c_ssize_t, [vp, u64, sz, vp, vp, P(u64), i]),
            "rbd_lock_acquire": (i, [vp, i]),
            "rbd_lock_release": (i, [vp]),
            "rbd_lock_break": (i, [vp, i, cp]),
            "rbd_lock_get_owners": (i, [vp, P(i), vp, P(sz)]),
            "rbd_lock_get_owners_cleanup": (None, [vp, sz]),
            "rbd_watchers_list": (i, [vp, vp, P(sz)]),
            "rbd_watchers_list_cleanup": (None, [vp, sz]),
            "rbd_update_watch": (i, [vp, P(u64), UPDATE_CALLBACK, vp]),
            "rbd_update_unwatch": (i, [vp, u64]),
            "rbd_create4": (i, [vp, cp, u64, vp]),
            "rbd_remove": (i, [vp, cp]),
            "rbd_image_options_create": (None, [P(vp)]),
            "rbd_image_options_destroy": (None, [vp]),
            "rbd_clone3": (i, [vp, cp, cp, vp, cp, vp]),
            "rbd_snap_protect": (i, [vp, cp]),
            "rbd_snap_is_protected": (i, [vp, cp, P(i)]),
        },
    }
    for lib, functions in signatures.items():
        for fn_name, (restype, argtypes) in functions.items():
            fn = getattr(lib, fn_name)
            fn.restype = restype
            fn.argtypes = argtypes


def _failed(code: int, what: str) -> OSError:
    """librbd's and librados' -errno as an OSError."""
    err = -code
    return OSError(err, f"{what}: {os.strerror(err)}")


# --- a cluster connection -------------------------------------------------------------


class _Cluster:
    """One `rados_t`, connected, with timeouts that make a lost cluster fail I/O."""

    def __init__(self, label: str, connection: Connection) -> None:
        try:
            self.rados, self.rbd = _load()
        except BackendError as exc:
            raise BackendError(f"{label}: {exc}") from None
        self.label = label
        client = connection.client_id.removeprefix("client.")
        handle = _c_void_p()
        rc = self.rados.rados_create(ctypes.byref(handle), client.encode())
        if rc < 0:
            raise BackendError(f"{label}: client id {client!r}: {os.strerror(-rc)}")
        self.handle: int | None = handle.value
        try:
            self._configure(connection)
            rc = self.rados.rados_connect(self.handle)
            if rc < 0:
                raise BackendError(f"{label}: {_connect_failure(-rc, client, connection)}")
        except BaseException:
            self.shutdown()
            raise

    def _configure(self, connection: Connection) -> None:
        conf = connection.conf.encode() if connection.conf is not None else None
        rc = self.rados.rados_conf_read_file(self.handle, conf)
        if rc < 0:
            where = connection.conf or "ceph.conf (/etc/ceph/ceph.conf, $CEPH_CONF)"
            raise BackendError(
                f"{self.label}: reading {where}: {os.strerror(-rc)} (give conf=FILE)"
            )
        if connection.keyring is not None:
            if not os.access(connection.keyring, os.R_OK):
                raise BackendError(f"{self.label}: keyring {connection.keyring}: cannot read it")
            self._set("keyring", connection.keyring)
        for option, (default, ours) in _TIMEOUTS.items():
            if self._get(option) == default:
                self._set(option, str(ours))
        self._set("rbd_cache", "false")

    def _get(self, option: str) -> str:
        buf = ctypes.create_string_buffer(256)
        rc = self.rados.rados_conf_get(self.handle, option.encode(), buf, len(buf))
        return buf.value.decode() if rc == 0 else ""

    def _set(self, option: str, value: str) -> None:
        rc = self.rados.rados_conf_set(self.handle, option.encode(), value.encode())
        if rc < 0:
            raise BackendError(f"{self.label}: setting {option}: {os.strerror(-rc)}")

    def fsid(self) -> str:
        buf = ctypes.create_string_buffer(64)
        rc = self.rados.rados_cluster_fsid(self.handle, buf, len(buf))
        return buf.value.decode() if rc >= 0 else ""

    def ioctx(self, pool: str) -> int:
        io = _c_void_p()
        rc = self.rados.rados_ioctx_create(self.handle, pool.encode(), ctypes.byref(io))
        if rc < 0:
            if rc == -errno.ENOENT:
                raise BackendError(f"{self.label}: the cluster has no pool {pool}")
            raise BackendError(f"{self.label}: pool {pool}: {os.strerror(-rc)}")
        assert io.value is not None
        return io.value

    def shutdown(self) -> None:
        if self.handle is not None:
            self.rados.rados_shutdown(self.handle)
            self.handle = None


def _connect_failure(err: int, client: str, connection: Connection) -> str:
    if err in (errno.EACCES, errno.EPERM, errno.EINVAL, errno.ENOENT):
        keyring = connection.keyring or "the conf's or /etc/ceph's keyring"
        return (
            f"cannot connect as client.{client}: {os.strerror(err)} "
            f"(check id= and keyring=; keyring used: {keyring})"
        )
    if err == errno.ETIMEDOUT:
        return (
            f"no monitor answered in {CONNECT_TIMEOUT_S} s (check 'mon host' in "
            f"{connection.conf or 'ceph.conf'}, and that the cluster is up)"
        )
    return f"cannot connect to the cluster: {os.strerror(err)}"


# --- the backend ----------------------------------------------------------------------


class RbdBackend:
    """One RBD image (or snapshot) as a backend slice, used whole."""

    #: no alignment of its own: librbd takes any byte range
    block_size = 1
    #: a network store: losing it is retryable (media_errors.UNREACHABLE)
    network = True

    def __init__(
        self,
        target: RbdImage,
        connection: Connection = Connection(),
        readonly: bool = False,
        create: int | None = None,
        clone: RbdImage | None = None,
    ) -> None:
        """Connect and open the image: made first if `create` (its size in bytes) or
        `clone` (a snapshot, copy-on-write) says so. No lock is taken yet (lock())."""
        self.target = target
        self.description = f"rbd:{target}"
        self.readonly = readonly or target.snapshot is not None
        self._io: int | None = None
        self._image: int | None = None
        self._watch: int | None = None
        self._listener: Callable[[], None] | None = None
        self._callback = UPDATE_CALLBACK(self._on_update)  # kept: librbd holds its address
        self._locked = False
        self._cluster = _Cluster(self.description, connection)
        self.rados, self.rbd = self._cluster.rados, self._cluster.rbd
        created = False
        try:
            self._io = self._cluster.ioctx(target.pool)
            if create is not None:
                self._create(create)
                created = True
            elif clone is not None:
                self._clone(clone)
                created = True
            self._open()
            self.size = self.store_size()
        except BaseException:
            self._close_image()
            if created:
                self._remove_created()
            self._disconnect()
            raise

    # --- opening ---------------------------------------------------------------------

    def _create(self, size: int) -> None:
        opts = _c_void_p()
        self.rbd.rbd_image_options_create(ctypes.byref(opts))
        try:
            rc = self.rbd.rbd_create4(self._io, self.target.image.encode(), size, opts)
        finally:
            self.rbd.rbd_image_options_destroy(opts)
        if rc == -errno.EEXIST:
            raise BackendError(
                f"{self.description}: create=: the image exists (leave out create= to use it)"
            )
        if rc < 0:
            raise BackendError(f"{self.description}: creating the image: {os.strerror(-rc)}")

    def _clone(self, parent: RbdImage) -> None:
        """A copy-on-write clone of `parent` (a snapshot) as the target image. Where the
        cluster only takes clone v1 (clients older than Mimic allowed), the parent
        snapshot must be protected: it is, first."""
        assert parent.snapshot is not None
        where = f"{self.description}: clone={parent}"
        parent_io = self._cluster.ioctx(parent.pool)
        try:
            rc = self._clone3(parent, parent_io)
            if rc == -errno.EINVAL and self._protect(parent, parent_io, where):
                rc = self._clone3(parent, parent_io)
        finally:
            self.rados.rados_ioctx_destroy(parent_io)
        if rc == -errno.EEXIST:
            raise BackendError(f"{where}: the image exists (leave out clone= to use it)")
        if rc == -errno.ENOENT:
            raise BackendError(f"{where}: no such image or snapshot")
        if rc < 0:
            raise BackendError(f"{where}: {os.strerror(-rc)}")

    def _clone3(self, parent: RbdImage, parent_io: int) -> int:
        assert parent.snapshot is not None
        opts = _c_void_p()
        self.rbd.rbd_image_options_create(ctypes.byref(opts))
        try:
            rc: int = self.rbd.rbd_clone3(
                parent_io,
                parent.image.encode(),
                parent.snapshot.encode(),
                self._io,
                self.target.image.encode(),
                opts,
            )
        finally:
            self.rbd.rbd_image_options_destroy(opts)
        return rc

    def _protect(self, parent: RbdImage, parent_io: int, where: str) -> bool:
        """Protect the parent snapshot; False if it already was (the EINVAL was not that)."""
        assert parent.snapshot is not None
        image = _c_void_p()
        rc = self.rbd.rbd_open(parent_io, parent.image.encode(), ctypes.byref(image), None)
        if rc < 0:
            hint = " (no such image)" if rc == -errno.ENOENT else ""
            raise BackendError(f"{where}: opening the parent: {os.strerror(-rc)}{hint}")
        try:
            snap = parent.snapshot.encode()
            protected = _c_int()
            rc = self.rbd.rbd_snap_is_protected(image, snap, ctypes.byref(protected))
            if rc == -errno.ENOENT:
                raise BackendError(f"{where}: no such snapshot")
            if rc < 0 or protected.value:
                return False
            rc = self.rbd.rbd_snap_protect(image, snap)
            if rc < 0 and rc != -errno.EBUSY:  # (EBUSY: protected meanwhile)
                raise BackendError(f"{where}: protecting the snapshot: {os.strerror(-rc)}")
            log.info("%s: protected snapshot %s (clone v1 needs it)", self.description, parent)
            return True
        finally:
            self.rbd.rbd_close(image)

    def _open(self) -> None:
        image = _c_void_p()
        name = self.target.image.encode()
        snap = self.target.snapshot.encode() if self.target.snapshot else None
        # A snapshot never changes: read-only, no watch. A head is opened writable even
        # for a read-only namespace: only then does librbd watch it (and see resizes),
        # unless the client may only read (a watch is a write: EPERM).
        opener = self.rbd.rbd_open_read_only if snap is not None else self.rbd.rbd_open
        rc = opener(self._io, name, ctypes.byref(image), snap)
        if rc == -errno.EPERM and self.readonly and snap is None:
            log.warning(
                "%s: the client may only read: opened without a watch, it does not "
                "see the image resized",
                self.description,
            )
            rc = self.rbd.rbd_open_read_only(self._io, name, ctypes.byref(image), None)
        if rc == -errno.ENOENT:
            hint = (
                "no such snapshot" if snap is not None else "no such image (create=SIZE makes one)"
            )
            raise BackendError(f"{self.description}: {hint}")
        if rc < 0:
            raise BackendError(f"{self.description}: opening the image: {os.strerror(-rc)}")
        self._image = image.value

    def _remove_created(self) -> None:
        """Remove the image this backend made: it could not be used after all."""
        rc = self.rbd.rbd_remove(self._io, self.target.image.encode())
        if rc < 0:
            log.warning("%s: removing it again: %s", self.description, os.strerror(-rc))

    def store_key(self) -> tuple[str, str, int, str]:
        """What identifies the image, however it was named: the cluster's fsid, the
        pool's id and the image's id (the sharing checks of storage.HostStorage)."""
        buf = ctypes.create_string_buffer(128)
        rc = self.rbd.rbd_get_id(self._image, buf, len(buf))
        image_id = buf.value.decode() if rc >= 0 else self.target.image
        pool_id = int(self.rados.rados_ioctx_get_id(self._io))
        return ("rbd", self._cluster.fsid(), pool_id, image_id)

    # --- the exclusive lock ------------------------------------------------------------

    def lock(self, break_lock: bool = False) -> None:
        """Take the image's exclusive lock, and keep it until close() (librbd then
        refuses it to everyone who asks). BackendError naming the holder if another
        client has it and still watches the image (alive, or dead too recently for its
        watch to have expired); with `break_lock`, that holder is blocklisted and the
        lock taken. A holder that no longer watches it is dead: librbd takes its lock
        (blocklisting it)."""
        if self.readonly or self._locked:
            return
        if not self._has_exclusive_lock_feature():
            raise BackendError(
                f"{self.description}: the image has no exclusive-lock feature, which a "
                f"writable namespace needs (rbd feature enable {self.target} exclusive-lock)"
            )
        # Asked first: against a holder that does not answer (hung, or killed a moment
        # ago) rbd_lock_acquire would wait until its watch expires (~30 s), then take it.
        owners = self._lock_owners()
        watching = self._watchers()
        holders = [o for o in owners if o in watching]
        if holders and not break_lock:
            raise self._locked_by(holders, watching)
        for owner in holders:
            rc = self.rbd.rbd_lock_break(self._image, RBD_LOCK_MODE_EXCLUSIVE, owner.encode())
            if rc < 0 and rc != -errno.ENOENT:
                raise BackendError(
                    f"{self.description}: break-lock: breaking the lock of "
                    f"{_holder(owner, watching)}: {os.strerror(-rc)}"
                )
            log.warning(
                "%s: broke the lock of %s (break-lock): it is blocklisted",
                self.description,
                _holder(owner, watching),
            )
        rc = self.rbd.rbd_lock_acquire(self._image, RBD_LOCK_MODE_EXCLUSIVE)
        if -rc in _LOCKED_ERRNOS:  # taken meanwhile
            raise self._locked_by(self._lock_owners(), self._watchers())
        if rc < 0:
            raise BackendError(f"{self.description}: taking the exclusive lock: {os.strerror(-rc)}")
        self._locked = True
        for owner in owners:
            if owner not in holders:
                log.warning(
                    "%s: took the lock of %s, which no longer watches the image (dead: "
                    "librbd blocklisted it)",
                    self.description,
                    _holder(owner, watching),
                )

    def release_lock(self) -> bool:
        """Flush and give the exclusive lock back, keeping the image open (a successor
        process takes it: upgrade in place); whether it was held. BackendError if the
        flush fails (then the lock is kept: unflushed writes must not change hands)."""
        if not self._locked or self._image is None:
            return False
        rc = self.rbd.rbd_flush(self._image)
        if rc < 0:
            raise BackendError(f"{self.description}: flush before the handover: {os.strerror(-rc)}")
        rc = self.rbd.rbd_lock_release(self._image)
        if rc < 0:
            raise BackendError(f"{self.description}: releasing the lock: {os.strerror(-rc)}")
        self._locked = False
        return True

    def _locked_by(self, owners: list[str], watching: dict[str, int]) -> BackendError:
        who = ", ".join(_holder(o, watching) for o in owners) or "another client"
        return BackendError(
            f"{self.description}: locked by {who}, which uses it (another nvme-mdev or VM, "
            "on this host or another); stop it first, or add break-lock if it is dead"
        )

    def _has_exclusive_lock_feature(self) -> bool:
        features = _c_uint64()
        rc = self.rbd.rbd_get_features(self._image, ctypes.byref(features))
        return rc < 0 or bool(features.value & RBD_FEATURE_EXCLUSIVE_LOCK)

    def _lock_owners(self) -> list[str]:
        """The exclusive lock's owners, by address, read from the image's header now
        (what rbd_lock_break takes)."""
        mode = _c_int()
        count = _c_size_t(8)
        owners = (_c_void_p * 8)()
        rc = self.rbd.rbd_lock_get_owners(
            self._image, ctypes.byref(mode), owners, ctypes.byref(count)
        )
        if rc < 0:
            return []
        try:
            return [ctypes.string_at(p).decode() for p in owners[: count.value] if p]
        finally:
            self.rbd.rbd_lock_get_owners_cleanup(owners, count)

    def _watchers(self) -> dict[str, int]:
        """The clients watching the image (this one too), address → global id (the N
        of client.N), as the OSD has them: a client that died stays until its watch
        expires (osd_client_watch_timeout, 30 s)."""
        watchers = (_Watcher * 64)()
        count = _c_size_t(len(watchers))
        rc = self.rbd.rbd_watchers_list(self._image, watchers, ctypes.byref(count))
        if rc < 0:
            return {}
        try:
            return {
                (w.addr or b"").decode(errors="replace"): int(w.id) for w in watchers[: count.value]
            }
        finally:
            self.rbd.rbd_watchers_list_cleanup(watchers, count)

    # --- size, and learning that it changed ---------------------------------------------

    def store_size(self) -> int:
        size = _c_uint64()
        rc = self.rbd.rbd_get_size(self._image, ctypes.byref(size))
        if rc < 0:
            raise _failed(rc, f"{self.description}: size")
        return int(size.value)

    def current_size(self) -> int:
        return self.store_size()

    def watch_size(self, listener: Callable[[], None]) -> None:
        """Call `listener()` (from a librbd thread: it must be quick and thread-safe)
        whenever the image's header changes, as `rbd resize` does. A snapshot never
        changes: nothing is watched."""
        self._listener = listener
        if self.target.snapshot is not None or self._watch is not None:
            return
        handle = _c_uint64()
        rc = self.rbd.rbd_update_watch(self._image, ctypes.byref(handle), self._callback, None)
        if rc < 0:
            log.warning(
                "%s: cannot watch for size changes (%s): use nvme-mdev ns rescan",
                self.description,
                os.strerror(-rc),
            )
            return
        self._watch = handle.value

    def _on_update(self, _arg: int | None) -> None:
        # librbd's thread: no locks, no librbd calls, never an exception out of here
        listener = self._listener
        if listener is not None:
            try:
                listener()
            except Exception:
                log.exception("%s: size change listener", self.description)

    # --- I/O ------------------------------------------------------------------------

    def readv(self, offset: int, buffers: Sequence[memoryview]) -> None:
        self._transfer(offset, buffers, write=False)

    def writev(self, offset: int, buffers: Sequence[memoryview], fua: bool) -> None:
        self._transfer(offset, buffers, write=True)
        if fua:
            self.flush()

    def _transfer(self, offset: int, buffers: Sequence[memoryview], write: bool) -> None:
        views = [b for b in buffers if b.nbytes]
        for start in range(0, len(views), IOV_MAX):  # librbd takes IOV_MAX iovecs a call
            chunk = views[start : start + IOV_MAX]
            offset += self._vectored(offset, chunk, write)

    def _vectored(self, offset: int, views: Sequence[memoryview], write: bool) -> int:
        """One rbd_aio_readv/writev with the buffers' own addresses, waited for."""
        count = len(views)
        iov = (_c_uint64 * (2 * count))()
        keep: list[object] = []
        total = 0
        for i, view in enumerate(views):
            try:
                address = _addressof(_c_char.from_buffer(view))
            except TypeError:  # a read-only mapping of guest memory
                if not write:
                    raise OSError(errno.EFAULT, "read into read-only guest memory") from None
                copy = bytearray(view)
                keep.append(copy)
                address = _addressof(_c_char.from_buffer(copy))
            iov[2 * i] = address
            iov[2 * i + 1] = view.nbytes
            total += view.nbytes
        completion = _c_void_p()
        rc = self.rbd.rbd_aio_create_completion(None, None, ctypes.byref(completion))
        if rc < 0:
            raise _failed(rc, self.description)
        try:
            submit = self.rbd.rbd_aio_writev if write else self.rbd.rbd_aio_readv
            rc = submit(self._image, iov, count, offset, completion)
            if rc >= 0:
                self.rbd.rbd_aio_wait_for_complete(completion)
                rc = self.rbd.rbd_aio_get_return_value(completion)
        finally:
            self.rbd.rbd_aio_release(completion)
        del keep  # (the copies lived until librbd was done with them)
        if rc == -errno.EINVAL and offset + total > self.store_size():
            raise EndOfStorage(min(offset, self.store_size()))
        if rc < 0:
            raise _failed(rc, f"{self.description}: {'write' if write else 'read'}")
        if not write and rc < total:
            raise EndOfStorage(offset + rc)  # the image shrank under the namespace
        return total

    def compare_and_write(
        self, offset: int, expected: bytes, data: bytes, fua: bool
    ) -> bool | None:
        """A fused Compare and Write as librbd's own compare-and-write, atomic on the
        OSD: True if the blocks held `expected` and now hold `data`, False if they
        differ (nothing written); None if librbd does not take this range (EINVAL: it
        crosses an object, or is more than this librbd takes in one call),
        and the caller compares and writes itself."""
        mismatch = _c_uint64()
        # (bytes go to C as they are: librbd only reads both buffers, during the call)
        rc = self.rbd.rbd_compare_and_write(
            self._image, offset, len(expected), expected, data, ctypes.byref(mismatch), 0
        )
        if rc == -errno.EINVAL:
            return None
        if rc == -errno.EILSEQ:
            return False
        if rc < 0:
            raise _failed(rc, f"{self.description}: compare and write")
        if fua:
            self.flush()
        return True

    def flush(self) -> None:
        if self.readonly:
            return
        rc = self.rbd.rbd_flush(self._image)
        if rc < 0:
            raise _failed(rc, f"{self.description}: flush")

    def write_zeroes(self, offset: int, length: int, deallocate: bool) -> None:
        """librbd's write-zeroes releases whole objects and zeroes the rest: the blocks
        read as zeroes afterwards, and space is freed where it can be, either way."""
        done = self.rbd.rbd_write_zeroes(self._image, offset, length, 0, 0)
        if done < 0:
            raise _failed(done, f"{self.description}: write zeroes")

    def deallocate(self, offset: int, length: int) -> None:
        """Deallocated blocks must read as zeroes (Identify reports DLFEAT 001b): librbd's
        discard skips partial objects and small ranges (rbd_skip_partial_discard,
        rbd_discard_granularity_bytes), its write-zeroes does not."""
        self.write_zeroes(offset, length, True)

    def io_target(self) -> IoTarget | None:
        return None  # no file descriptor: librbd's calls instead

    def image_handle(self) -> int:
        """The open `rbd_image_t`, for the native data plane, which makes librbd's
        asynchronous calls on it itself (native/src/rbd.rs); valid until close(), and
        the namespace is detached from the plane before that."""
        if self._image is None:
            raise BackendError(f"{self.description}: the image is closed")
        return self._image

    # --- closing ----------------------------------------------------------------------

    def close(self) -> None:
        """Flush, stop watching, give the lock back, close: the next opener, here or on
        another host, can take the image at once."""
        self._close_image()
        self._disconnect()

    def _close_image(self) -> None:
        if self._image is None:
            return
        image, self._image = self._image, None
        self._listener = None
        if self._watch is not None:
            self.rbd.rbd_update_unwatch(image, self._watch)  # (waits for a callback running)
            self._watch = None
        if self._locked:
            # (only the lock's owner may write, so only it has anything to flush)
            rc = self.rbd.rbd_flush(image)
            if rc < 0:
                log.warning("%s: flush on close: %s", self.description, os.strerror(-rc))
            rc = self.rbd.rbd_lock_release(image)
            if rc < 0:
                log.warning("%s: releasing the lock: %s", self.description, os.strerror(-rc))
            self._locked = False
        self.rbd.rbd_close(image)

    def _disconnect(self) -> None:
        if self._io is not None:
            self.rados.rados_ioctx_destroy(self._io)
            self._io = None
        self._cluster.shutdown()
