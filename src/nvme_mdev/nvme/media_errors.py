"""What a command completes with when the host storage under its namespace fails: an
OSError from a backend, turned into the status the NVMe specifications give for it
(Base 2.0c 4.6.1.2.1 Generic Command Status, 4.6.1.2.3 Media and Data Integrity
Errors; NVM Command Set 1.0c 3.x for Capacity Exceeded and LBA Out of Range).

host error                                  status (SCT/SC)                     DNR  also
EIO, EBADMSG, EUCLEAN, EILSEQ, and any      read: Unrecovered Read Error 2/81   no   SMART Media
  errno not below                           write, flush: Write Fault 2/80           Errors + 1
ENOSPC, EDQUOT, EFBIG (a file)              Capacity Exceeded 0/81              yes
a read past the end of a store that shrank  LBA Out of Range 0/80               yes  (rescan)
  (ENOSPC writing a block device: the same)
EROFS                                       Namespace Is Write Protected 0/20   yes  NSATTR write
                                                                                     protected,
                                                                                     NS Attribute
                                                                                     Changed
EACCES, EPERM                               Access Denied 2/86                  yes
EAGAIN, EINTR, ETIMEDOUT, EBUSY             Command Interrupted 0/21            no
ENODEV, ENXIO, ESTALE, ENOTCONN, ESHUTDOWN, Namespace Not Ready 0/82            yes  every later
  EBADF; a block device whose capacity is                                            command fails
  now 0 (a deleted disk); a network store                                            at once; SMART
  that fenced this client off (Ceph's                                                warning bit 2,
  EBLOCKLISTED is ESHUTDOWN)                                                         its event
a network store (a Ceph RBD image) out of   Namespace Not Ready 0/82            no   (the namespace
  reach: ETIMEDOUT (its operation timeout),                                          stays; later
  ENOTCONN, ECONNREFUSED, ECONNRESET,                                                commands try
  ECONNABORTED, EHOSTUNREACH, ENETUNREACH,                                           the store
  ENETDOWN, EHOSTDOWN                                                                again)

Every one of them is an Error Information log entry (with the command's first LBA).

Why these: a media error is what the guest's own disk would report for a bad sector,
and the host kernel may have met a transient fault, so the guest may retry (QEMU's
NVMe device answers EIO the same way). Namespace Not Ready with DNR is the spec's
'not accessible, and re-issuing later will not help' (Linux fails it at once, as
BLK_STS_TARGET, instead of retrying a dead disk for minutes). A device that went
away is not always an errno of its own: the block layer fails I/O to a deleted disk
with EIO, and writes past a device's end with ENOSPC; so for EIO and ENOSPC the
store is asked its size before the status is chosen.

A network store is another matter: a cluster that does not answer (an operation that
timed out, a connection that is down) is usually a cluster that will be back, and the
storage itself is intact. Its commands fail with Namespace Not Ready *without* Do Not
Retry — Linux retries them, up to nvme_max_retries times — and the namespace is not
marked gone: the next command tries the cluster again. A backend says it is one with a
true `network` attribute (backends/rbd.py); files and block devices keep the table
above as it is. The native data plane's copy (native/src/media_errors.rs) has the same
rule for its RBD namespaces (classify_store).

A file that was unlinked is not gone: the namespace keeps its inode and I/O keeps
working (failing it would lose what the guest could still save); `ns rescan` says so.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass

from ..backends.base import Backend
from ..backends.file import BackendError, EndOfStorage
from .spec import Status

#: the storage has gone away, and will not come back by itself
GONE_ERRNOS = frozenset(
    (errno.ENODEV, errno.ENXIO, errno.ESTALE, errno.ENOTCONN, errno.ESHUTDOWN, errno.EBADF)
)
NO_SPACE_ERRNOS = frozenset((errno.ENOSPC, errno.EDQUOT, errno.EFBIG))
DENIED_ERRNOS = frozenset((errno.EACCES, errno.EPERM))
INTERRUPTED_ERRNOS = frozenset((errno.EAGAIN, errno.EINTR, errno.ETIMEDOUT, errno.EBUSY))
#: a network store (a backend whose `network` is true) that cannot be reached, for now.
#: Not EBLOCKLISTED (ESHUTDOWN on Linux): a client the cluster fenced off (someone broke
#: its lock) can never write again, and the namespace is gone for good.
UNREACHABLE_ERRNOS = frozenset(
    (
        errno.ETIMEDOUT,
        errno.ENOTCONN,
        errno.ECONNREFUSED,
        errno.ECONNRESET,
        errno.ECONNABORTED,
        errno.EHOSTUNREACH,
        errno.ENETUNREACH,
        errno.ENETDOWN,
        errno.EHOSTDOWN,
    )
)


@dataclass(frozen=True)
class HostFailure:
    """How one failed backend access completes its command, and what else it means."""

    status: int
    dnr: bool
    #: counted in SMART's Media and Data Integrity Errors
    media: bool = False
    #: the store has gone: the namespace fails every later command (Namespace Not Ready)
    gone: bool = False
    #: the store went read-only: the namespace becomes write protected
    read_only: bool = False


GONE = HostFailure(Status.NAMESPACE_NOT_READY, dnr=True, gone=True)
#: a network store out of reach: not ready now, and worth retrying
UNREACHABLE = HostFailure(Status.NAMESPACE_NOT_READY, dnr=False)
PAST_END = HostFailure(Status.LBA_OUT_OF_RANGE, dnr=True)
NO_SPACE = HostFailure(Status.CAPACITY_EXCEEDED, dnr=True)
READ_ONLY = HostFailure(Status.NAMESPACE_WRITE_PROTECTED, dnr=True, read_only=True)
DENIED = HostFailure(Status.ACCESS_DENIED, dnr=True)
INTERRUPTED = HostFailure(Status.COMMAND_INTERRUPTED, dnr=False)
READ_MEDIA_ERROR = HostFailure(Status.UNRECOVERED_READ_ERROR, dnr=False, media=True)
WRITE_MEDIA_ERROR = HostFailure(Status.WRITE_FAULT, dnr=False, media=True)


def classify(exc: OSError, writing: bool, backend: Backend) -> HostFailure:
    """The failure `exc` (raised by `backend` while reading, or `writing`) stands for."""
    code = exc.errno
    if code in UNREACHABLE_ERRNOS and getattr(backend, "network", False):
        return UNREACHABLE
    if code in GONE_ERRNOS:
        return GONE
    is_block_device = bool(getattr(backend, "is_block_device", False))
    past_end = isinstance(exc, EndOfStorage) or (code == errno.ENOSPC and is_block_device)
    if code in (errno.EIO, errno.ENOSPC):
        # The errno cannot tell a bad sector from a deleted disk, nor a full filesystem
        # from a device that shrank: ask the store (only on this slow path).
        try:
            size = backend.store_size()
        except OSError as probe:
            return GONE if probe.errno in GONE_ERRNOS else _media(writing)
        except BackendError:
            size = -1
        if size == 0 and is_block_device:
            return GONE
    if past_end:
        return PAST_END
    if code in NO_SPACE_ERRNOS:
        return NO_SPACE
    if code == errno.EROFS:
        return READ_ONLY
    if code in DENIED_ERRNOS:
        return DENIED
    if code in INTERRUPTED_ERRNOS:
        return INTERRUPTED
    return _media(writing)


def _media(writing: bool) -> HostFailure:
    return WRITE_MEDIA_ERROR if writing else READ_MEDIA_ERROR
