"""The NVM command set's I/O commands (NVM Command Set 1.x, 3.3): Read, Write, Flush,
Write Zeroes, Dataset Management, Compare, Verify and Copy.

Each handler validates the command against the namespace and the controller's
limits, then moves data between the backend and zero-copy views of guest
memory, described by PRPs (prp.py) or SGLs (sgl.py) as CDW0.PSDT chooses.
Failures are raised as CommandError; the caller posts the completion.

Refused, and reported as such in Identify and the Commands Supported and Effects log:
- Write Uncorrectable (Invalid Command Opcode; ONCS bit 1 clear): the marks would
  have to outlive the process and be checked on every read, and a slice of host
  storage has nowhere truthful to keep them.
A backend's failure completes the command with the status media_errors.py chooses.
Limited Retry is accepted and has no effect: nothing here retries. Protection
information fields are ignored: no namespace is formatted with it.

Fused operations (Base 3.4.2): Compare and Write only (FUSES bit 0), as fused(). The
data planes pair the two entries of the SQ and run them here as one unit, with nothing
else of the controller's in flight (their I/O is drained first and nothing else is
submitted meanwhile: atomic against every other command of this controller, the only
one that may write the namespace). A lone half, or FUSE 11b, reaches execute(), which
answers it (Missing Fused Command; Invalid Field). A pair larger than ACWU
(acwu_blocks()), of other opcodes, or whose halves name different namespaces or LBA
ranges fails whole with Invalid Field in Command; a failed Compare aborts the Write
(Failed Fused Command); a failed Write leaves the Compare's status as it was. An RBD
namespace runs the pair as librbd's compare-and-write where librbd takes the range.
"""

from __future__ import annotations

import errno
import os
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final

from ..backends.io_engine import IoEngine, SyncEngine, Transfer
from ..dataplane.events import StorageFailed
from ..guest_memory import GuestMemory
from . import media_errors, passthrough
from .errors import CommandError
from .namespace import Namespace
from .prp import (
    Segment,
    copy_from_guest,
    copy_to_guest,
    prp_segments,
    prp_views,
)
from .sgl import (
    SGLS_BYTE_GRANULARITY,
    SGLS_DWORD_GRANULARITY,
    sgl_copy_to_guest,
    sgl_segments,
    sgl_views,
)
from .spec import DNR, IoOpcode, Status, with_dnr

BROADCAST_NSID = 0xFFFFFFFF
_DSM_RANGE = struct.Struct("<IIQ")  # context attributes, NLB, SLBA
DSM_MAX_RANGES = 256
DSM_DEALLOCATE: Final = 1 << 2  # CDW11 AD
# Source Range Entries Copy Descriptor Format 0h (32 bytes): SLBA at 8, RPARS (NLB 15:0)
# at 16; the rest is reserved or protection information, which no namespace has.
_COPY_RANGE_FORMAT_0 = struct.Struct("<8xQI12x")
COPY_DESCRIPTOR_FORMATS: Final = 1 << 0  # Identify Controller CDFS/OCFS: format 0h only
#: Source ranges per Copy: 128 format 0h entries fill one 4 KiB page, one PRP entry.
COPY_MAX_RANGES: Final = 128

#: opcodes whose data length the statistics and SMART count as data moved
_DATA_OPCODES: Final = frozenset((IoOpcode.READ, IoOpcode.WRITE, IoOpcode.COMPARE))
#: what the kernel answers for a command it refused to send (not a storage failure)
_REFUSED_ERRNOS: Final = frozenset((errno.EINVAL, errno.EFAULT, errno.E2BIG, errno.EOPNOTSUPP))
ALLOWED_WRITES: Final = passthrough.ALLOWED_OPCODES

# Command Dword 0
CDW0_FUSE: Final = 0x3 << 8
CDW0_FUSE_FIRST: Final = 0x1 << 8
CDW0_FUSE_SECOND: Final = 0x2 << 8
CDW0_PSDT: Final = 0x3 << 14
# Command Dword 12 of Read, Write, Compare, Verify, Write Zeroes, Copy
FUA: Final = 1 << 30
PRACT: Final = 1 << 29  # PRINFO bit 3
DEAC: Final = 1 << 25  # Write Zeroes: deallocate


#: the largest logical block a namespace may have (namespace.SUPPORTED_BLOCK_SIZES)
_LARGEST_BLOCK_SHIFT: Final = 12


def acwu_blocks(max_transfer: int) -> int:
    """Atomic Compare & Write Unit in logical blocks (Identify Controller ACWU is this
    less one): what one data transfer holds in blocks of the largest format, so that the
    unit holds for every namespace and a pair within it never meets MDTS first."""
    return min(max_transfer >> _LARGEST_BLOCK_SHIFT, 1 << 16)


@dataclass(frozen=True)
class CopyLimits:
    """What Identify Namespace reports for Copy (MSSRL, MCL, MSRC) and Copy enforces."""

    #: logical blocks in one source range
    mssrl: int
    #: logical blocks in one command
    mcl: int
    #: source ranges in one command, 0's based
    msrc: int


def copy_limits(ns: Namespace, max_transfer: int) -> CopyLimits:
    """A Copy moves at most one maximum data transfer: it is staged in one buffer,
    read whole before it is written (so overlapping ranges copy as if sequential)."""
    mcl = max_transfer >> ns.lba_shift
    return CopyLimits(mssrl=min(mcl, 0xFFFF), mcl=mcl, msrc=COPY_MAX_RANGES - 1)


@dataclass
class IoCounters:
    """What SMART / Health reports about host I/O (Base 5.16.1.3)."""

    host_read_commands: int = 0
    host_write_commands: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    media_errors: int = 0
    #: every backend error, media or not (statistics: host_io_errors)
    host_errors: int = 0


@dataclass(frozen=True, slots=True)
class Completed:
    """A command that is done: the completion to post. `status` is the Status Field
    (0 for success; with DNR as it will be posted); `lba` is what the Error Information
    log reports for a failure; `message` says why, for the log."""

    status: int = 0
    dw0: int = 0
    lba: int = 0
    message: str = ""


#: the completion of almost every command
SUCCESS: Final = Completed()

#: what executing a command gives: done, or its transfer submitted to the engine (the
#: command completes when the engine hands the Transfer back: finish())
Outcome = Completed | Transfer


def failed(err: CommandError) -> Completed:
    """The completion a CommandError stands for (DNR per spec.with_dnr unless it says)."""
    if err.dnr is None:
        status = with_dnr(err.status)
    else:
        status = err.status | DNR if err.dnr else err.status
    return Completed(status, err.result, err.lba, str(err))


#: a command handler: None for success (CommandError raised on failure), or the outcome
#: of the transfer it handed to the engine
Handler = Callable[[tuple[int, ...]], Outcome | None]


def _emit_nothing(event: object) -> None:
    pass


class IoCommandSet:
    """Executes I/O commands against a set of namespaces: execute() answers with the
    command's completion, or with its Transfer if the engine submitted it, which
    finish() completes once the engine hands it back."""

    def __init__(
        self,
        memory: GuestMemory,
        namespaces: dict[int, Namespace],
        max_transfer: int,
        counters: IoCounters,
        max_namespaces: int,
        sgl_support: int = SGLS_BYTE_GRANULARITY,
    ) -> None:
        self.memory = memory
        self.namespaces = namespaces
        #: Identify Controller NN: NSIDs 1..NN are valid, active or not
        self.max_namespaces = max_namespaces
        self.max_transfer = max_transfer
        self.counters = counters
        #: runs the transfers of Read and Write (the data plane's I/O engine)
        self.engine: IoEngine = SyncEngine()
        #: Volatile Write Cache feature (WCE): while it is off every write is made durable
        #: before it completes, as if FUA were set (the data plane's settings)
        self.write_cache = True
        #: told of a backend failure that changes the namespace (gone, or read-only): a
        #: StorageFailed event for the control side, which applies it
        self.emit: Callable[[StorageFailed], None] = _emit_nothing
        #: namespaces whose storage is gone, by nsid, with why: their next commands fail
        #: at once, before the control side has applied the event (Namespace.failure)
        self.gone: dict[int, str] = {}
        #: SGL Support as Identify Controller reports it (SGLS bits 1:0): 0 PRPs only,
        #: else SGLS_BYTE_GRANULARITY or SGLS_DWORD_GRANULARITY (ControllerConfig's)
        self.sgl_support = sgl_support
        #: staging for Verify and Copy, allocated on first use, max_transfer bytes
        self._scratch: memoryview | None = None
        #: some namespace passes commands through to a host NVMe namespace (the owner
        #: sets it when one is added; it only makes execute() look the namespace up)
        self.passthrough = False
        self._handlers: dict[int, Handler] = {
            IoOpcode.READ: self.read,
            IoOpcode.WRITE: self.write,
            IoOpcode.FLUSH: self.flush,
            IoOpcode.WRITE_ZEROES: self.write_zeroes,
            IoOpcode.DATASET_MANAGEMENT: self.dataset_management,
            IoOpcode.COMPARE: self.compare,
            IoOpcode.VERIFY: self.verify,
            IoOpcode.COPY: self.copy,
        }
        self._sgl_handlers: dict[int, Handler] = {
            IoOpcode.READ: self._read_sgl,
            IoOpcode.WRITE: self._write_sgl,
        }

    def execute(self, dw: tuple[int, ...]) -> Outcome:
        """Run the command in SQE dwords `dw`."""
        try:
            if self.passthrough:  # (False unless a passthrough namespace was ever added)
                ns = self.namespaces.get(dw[1])
                if ns is not None and ns.passthrough and ns.failure is None:
                    if ns.nsid in self.gone:
                        raise CommandError(Status.NAMESPACE_NOT_READY, self.gone[ns.nsid], dnr=True)
                    return self._pass_through(ns, dw)
            handler = self._handlers.get(dw[0] & 0xFF)
            if handler is None:
                raise CommandError(Status.INVALID_OPCODE)
            if dw[0] & 0xC300:  # FUSE or PSDT (a literal: this runs for every command)
                handler = self._sgl_handler(dw[0], handler)
            outcome = handler(dw)
        except CommandError as err:
            return failed(err)
        return SUCCESS if outcome is None else outcome

    def finish(self, t: Transfer) -> Completed:
        """The completion of a command whose transfer the engine ran, at once or
        submitted: a short one is finished here (rare), errors become NVMe statuses,
        and the SMART counters count it."""
        try:
            if t.passthrough:
                return self._passed_through(t.dw, t.result, t.dw0, t.length)
            self._transferred(t)
        except CommandError as err:
            return failed(err)
        return SUCCESS

    def _transferred(self, t: Transfer) -> None:
        res = t.result
        try:
            if t.error is not None:
                raise t.error
            if res < 0:
                raise OSError(-res, os.strerror(-res))
            if res < t.length:
                rest = _after(t.views, res)
                if t.write:
                    t.backend.writev(t.offset + res, rest, t.fua)
                else:
                    t.backend.readv(t.offset + res, rest)
        except OSError as exc:
            ns = self.namespaces.get(t.dw[1])
            if ns is None:  # (a hot remove drains its I/O first: not expected)
                status = Status.WRITE_FAULT if t.write else Status.UNRECOVERED_READ_ERROR
                raise CommandError(status, str(exc)) from exc
            raise self._host_error(exc, ns, t.write, t.offset) from exc
        counters = self.counters
        if t.write:
            counters.host_write_commands += 1
            counters.bytes_written += t.length
        else:
            counters.host_read_commands += 1
            counters.bytes_read += t.length

    def _pass_through(self, ns: Namespace, dw: tuple[int, ...]) -> Outcome:
        """NVMe passthrough (passthrough.py): the checked command goes to the host's
        namespace with the guest's buffers, submitted to the engine or run at once."""
        t = passthrough.check(dw, ns.blocks, ns.lba_shift, self.max_transfer, ns.readonly)
        views: list[memoryview] = []
        if t.length:
            if dw[0] & CDW0_PSDT:
                if not self.sgl_support:
                    raise CommandError(Status.INVALID_FIELD, "SGLs are not supported")
                mapped = sgl_views(
                    self.memory, self._segments(dw, t.length, t.to_guest), t.to_guest
                )
            else:
                prp1, prp2 = dw[6] | (dw[7] << 32), dw[8] | (dw[9] << 32)
                _, mapped = prp_views(self.memory, prp1, prp2, t.length, t.to_guest)
            if mapped is None:
                raise CommandError(
                    Status.INVALID_FIELD, "passthrough needs guest memory shared with the device"
                )
            views = mapped
        transfer = self.engine.passthrough(ns.backend, dw, views, None)
        transfer.length = t.length if dw[0] & 0xFF in _DATA_OPCODES else 0
        return self._outcome(transfer)

    def _outcome(self, t: Transfer) -> Outcome:
        """A submitted transfer is the outcome (finish() completes it later); one done
        at once completes here, and goes back to the engine."""
        if t.submitted:
            return t
        try:
            return self.finish(t)
        finally:
            self.engine.release(t)

    def _passed_through(self, dw: tuple[int, ...], res: int, dw0: int, length: int) -> Completed:
        """A passthrough command's end: `res` 0, the host's NVMe status (> 0), or -errno
        (the kernel's); counted as the command set counts its own."""
        opcode = dw[0] & 0xFF
        slba = dw[10] | (dw[11] << 32)
        if res > 0:
            if (res >> 8) & 0x7 == 2:  # Media and Data Integrity Errors
                self.counters.media_errors += 1
            raise passthrough.host_status(res, dw0, slba)
        if res < 0:
            ns = self.namespaces.get(dw[1])
            err = -res
            exc = OSError(err, os.strerror(err))
            if err in _REFUSED_ERRNOS or ns is None:
                # The kernel would not take it (EINVAL: a limit of the host's queue we
                # did not know); not a fault of the storage.
                raise CommandError(Status.INVALID_FIELD, f"host kernel: {exc.strerror}")
            raise self._host_error(exc, ns, bool(ALLOWED_WRITES.get(opcode)), slba << ns.lba_shift)
        counters = self.counters
        if opcode == IoOpcode.WRITE:
            counters.host_write_commands += 1
            counters.bytes_written += length
        elif opcode in (IoOpcode.READ, IoOpcode.COMPARE):
            counters.host_read_commands += 1
            counters.bytes_read += length
        return Completed(0, dw0) if dw0 else SUCCESS

    def _sgl_handler(self, cdw0: int, handler: Handler) -> Handler:
        """The handler for a command whose data pointer is an SGL. Read and Write have
        their own, so that their PRP path tests nothing it does not need. A fused
        command here is alone: the data planes hand pairs to fused()."""
        fuse = cdw0 & CDW0_FUSE
        if fuse:
            if _FUSED_OPCODES.get(fuse) != cdw0 & 0xFF:  # (11b included: reserved)
                raise CommandError(Status.INVALID_FIELD, "no such fused operation")
            raise CommandError(
                Status.ABORT_FUSE_MISSING, "the other command of its fused operation is missing"
            )
        self._check_pointer_type(cdw0)
        # PSDT 01b and 10b differ only in what MPTR holds, and no format has metadata.
        # The others find their data pointer through _segments().
        return self._sgl_handlers.get(cdw0 & 0xFF, handler)

    def _check_pointer_type(self, cdw0: int) -> None:
        if cdw0 & CDW0_PSDT == CDW0_PSDT:
            raise CommandError(Status.INVALID_FIELD, "PSDT 11b is reserved")
        if cdw0 & CDW0_PSDT and not self.sgl_support:
            raise CommandError(Status.INVALID_FIELD, "SGLs are not supported")

    def _namespace(self, nsid: int) -> Namespace:
        ns = self.namespaces.get(nsid)
        if ns is None or ns.failure is not None or (self.gone and nsid in self.gone):
            if ns is None:
                # Base 2.0+ (NSID types): an invalid NSID (0, above NN, FFFFFFFFh where
                # no broadcast is allowed) is Invalid Namespace or Format; a valid but
                # inactive one (a slot without a namespace, one hot-removed) is Invalid
                # Field in Command.
                if 0 < nsid <= self.max_namespaces:
                    raise CommandError(Status.INVALID_FIELD, f"nsid {nsid} is not active")
                raise CommandError(Status.INVALID_NAMESPACE, f"nsid {nsid:#x}")
            # Its storage is gone: fail fast, never touch it again (DNR: retrying
            # later will not help until the operator replaces it).
            why = ns.failure or self.gone[nsid]
            raise CommandError(Status.NAMESPACE_NOT_READY, why, dnr=True)
        return ns

    def _host_error(self, exc: OSError, ns: Namespace, writing: bool, offset: int) -> CommandError:
        """The completion for a backend's failure at byte `offset` of `ns`, counted."""
        failure = media_errors.classify(exc, writing, ns.backend)
        counters = self.counters
        counters.host_errors += 1
        if failure.media:
            counters.media_errors += 1
        reason = f"{ns.backend.description}: {exc.strerror or exc}"
        if failure.gone and exc.errno not in media_errors.GONE_ERRNOS:
            reason = f"{ns.backend.description}: its capacity is now 0 (the device is gone)"
        if failure.gone:
            self.gone[ns.nsid] = reason
        if failure.gone or failure.read_only:
            self.emit(StorageFailed(ns.nsid, failure.gone, failure.read_only, reason))
        return CommandError(failure.status, reason, dnr=failure.dnr, lba=offset >> ns.lba_shift)

    def _data_range(self, ns: Namespace, dw: tuple[int, ...]) -> tuple[int, int]:
        slba = dw[10] | (dw[11] << 32)
        nlb = (dw[12] & 0xFFFF) + 1
        offset, length = ns.byte_range(slba, nlb)
        if length > self.max_transfer:
            raise CommandError(Status.INVALID_FIELD, f"{length} bytes > MDTS")
        return offset, length

    def _segments(self, dw: tuple[int, ...], length: int, to_guest: bool) -> list[Segment]:
        """The data pointer of a command, PRPs or SGLs (Read and Write take a shortcut
        for PRPs: prp_views)."""
        if dw[0] & CDW0_PSDT:
            return sgl_segments(
                self.memory, dw, length, to_guest, self.sgl_support == SGLS_DWORD_GRANULARITY
            )
        return prp_segments(self.memory, dw[6] | (dw[7] << 32), dw[8] | (dw[9] << 32), length)

    def _commit(self, ns: Namespace) -> None:
        """FUA on a command that reads: what the volatile cache holds reaches the medium
        first (with the cache off, every write already did)."""
        if self.write_cache:
            try:
                ns.backend.flush()
            except OSError as exc:
                raise self._host_error(exc, ns, True, 0) from exc

    def _scratch_buffer(self) -> memoryview:
        if self._scratch is None:
            self._scratch = memoryview(bytearray(self.max_transfer))
        return self._scratch

    def read(self, dw: tuple[int, ...]) -> Outcome:
        ns = self._namespace(dw[1])
        offset, length = self._data_range(ns, dw)
        if dw[12] & (1 << 30):  # FUA (folded to a constant: this is the hot path)
            self._commit(ns)
        prp1, prp2 = dw[6] | (dw[7] << 32), dw[8] | (dw[9] << 32)
        segments, views = prp_views(self.memory, prp1, prp2, length, to_guest=True)
        return self._read_to_guest(ns, dw, offset, length, segments, views, copy_to_guest)

    def _read_sgl(self, dw: tuple[int, ...]) -> Outcome:
        """Read with an SGL: as read(), and bit buckets discard what they cover."""
        ns = self._namespace(dw[1])
        offset, length = self._data_range(ns, dw)
        if dw[12] & FUA:
            self._commit(ns)
        segments = self._segments(dw, length, True)
        views = sgl_views(self.memory, segments, to_guest=True)
        return self._read_to_guest(ns, dw, offset, length, segments, views, sgl_copy_to_guest)

    def _read_to_guest(
        self,
        ns: Namespace,
        dw: tuple[int, ...],
        offset: int,
        length: int,
        segments: list[Segment],
        views: list[memoryview] | None,
        scatter: Callable[[GuestMemory, list[Segment], bytearray], None],
    ) -> Outcome:
        """The engine reads straight into the guest's buffers (`views`); where memory
        is not mapped, the backend reads into a bounce buffer that `scatter` copies to
        the segments."""
        if views is not None:
            t = self.engine.readv(ns.backend, offset, views, length, None)
            t.dw = dw
            return self._outcome(t)
        bounce = bytearray(length)
        try:
            ns.backend.readv(offset, [memoryview(bounce)])
        except OSError as exc:
            raise self._host_error(exc, ns, False, offset) from exc
        scatter(self.memory, segments, bounce)
        counters = self.counters
        counters.host_read_commands += 1
        counters.bytes_read += length
        return SUCCESS

    def write(self, dw: tuple[int, ...]) -> Outcome:
        ns = self._namespace(dw[1])
        offset, length = self._data_range(ns, dw)
        if ns.readonly:
            raise CommandError(Status.NAMESPACE_WRITE_PROTECTED)
        fua = bool(dw[12] & (1 << 30)) or not self.write_cache
        prp1, prp2 = dw[6] | (dw[7] << 32), dw[8] | (dw[9] << 32)
        segments, views = prp_views(self.memory, prp1, prp2, length, to_guest=False)
        return self._write_from_guest(ns, dw, offset, length, segments, views, fua)

    def _write_sgl(self, dw: tuple[int, ...]) -> Outcome:
        """Write with an SGL: as write() (a bit bucket in a write has no effect)."""
        ns = self._namespace(dw[1])
        offset, length = self._data_range(ns, dw)
        if ns.readonly:
            raise CommandError(Status.NAMESPACE_WRITE_PROTECTED)
        fua = bool(dw[12] & FUA) or not self.write_cache
        segments = self._segments(dw, length, False)
        views = sgl_views(self.memory, segments, to_guest=False)
        return self._write_from_guest(ns, dw, offset, length, segments, views, fua)

    def _write_from_guest(
        self,
        ns: Namespace,
        dw: tuple[int, ...],
        offset: int,
        length: int,
        segments: list[Segment],
        views: list[memoryview] | None,
        fua: bool,
    ) -> Outcome:
        """The engine writes straight from the guest's buffers, or from a copy of the
        segments when memory is not mapped."""
        if views is None:
            views = [memoryview(copy_from_guest(self.memory, segments))]
        t = self.engine.writev(ns.backend, offset, views, length, fua, None)
        t.dw = dw
        return self._outcome(t)

    def flush(self, dw: tuple[int, ...]) -> None:
        nsid = dw[1]
        if nsid != BROADCAST_NSID:
            ns = self._namespace(nsid)
            try:
                ns.backend.flush()
            except OSError as exc:
                raise self._host_error(exc, ns, True, 0) from exc
            return
        # Every namespace is flushed, even past one that fails; the first failure is
        # what the command reports. A namespace whose storage is gone cannot be made
        # durable: the flush does not pretend it was.
        error: CommandError | None = None
        for ns in list(self.namespaces.values()):
            why = ns.failure or self.gone.get(ns.nsid)
            if why is not None:
                error = error or CommandError(Status.NAMESPACE_NOT_READY, why, dnr=True)
                continue
            try:
                ns.backend.flush()
            except OSError as exc:
                error = error or self._host_error(exc, ns, True, 0)
        if error is not None:
            raise error

    def write_zeroes(self, dw: tuple[int, ...]) -> None:
        """Write Zeroes; with DEAC the blocks are deallocated (a hole punched in a file,
        which reads back zeroes as DLFEAT says). NSZ is not supported (ONCS NSZS clear),
        so it has no effect; no size limit (WZSL 0)."""
        ns = self._namespace(dw[1])
        slba = dw[10] | (dw[11] << 32)
        offset, length = ns.byte_range(slba, (dw[12] & 0xFFFF) + 1)
        if ns.readonly:
            raise CommandError(Status.NAMESPACE_WRITE_PROTECTED)
        deallocate = bool(dw[12] & DEAC)
        try:
            ns.backend.write_zeroes(offset, length, deallocate)
            if dw[12] & FUA or not self.write_cache:  # FUA or write-through
                ns.backend.flush()
        except OSError as exc:
            raise self._host_error(exc, ns, True, offset) from exc

    def dataset_management(self, dw: tuple[int, ...]) -> None:
        """Every attribute combination is accepted (NVM 3.3.3); Deallocate (AD) is
        honoured, Integral Dataset for Read/Write and the per-range context attributes
        are hints with nothing to act on. No processing limits (DMRL/DMRSL/DMSL 0)."""
        ns = self._namespace(dw[1])
        count = (dw[10] & 0xFF) + 1
        segments = self._segments(dw, count * _DSM_RANGE.size, to_guest=False)
        raw = copy_from_guest(self.memory, segments)
        ranges = [ns.byte_range(slba, nlb) for _, nlb, slba in _DSM_RANGE.iter_unpack(raw) if nlb]
        if not dw[11] & DSM_DEALLOCATE:
            return
        if ns.readonly:
            raise CommandError(Status.NAMESPACE_WRITE_PROTECTED)
        for offset, length in ranges:
            try:
                ns.backend.deallocate(offset, length)
            except OSError as exc:
                raise self._host_error(exc, ns, True, offset) from exc

    def compare(self, dw: tuple[int, ...]) -> None:
        """Compare (NVM 3.3.1): the blocks against the host's buffer; Compare Failure
        if any byte differs."""
        ns = self._namespace(dw[1])
        offset, length = self._data_range(ns, dw)
        if dw[12] & FUA:
            self._commit(ns)
        # Fetch the host's data first: a bad data pointer fails before the media is read.
        expected = copy_from_guest(self.memory, self._segments(dw, length, to_guest=False))
        self._compare_stored(ns, offset, expected)

    def fused(self, first: tuple[int, ...], second: tuple[int, ...]) -> tuple[Completed, Completed]:
        """Compare and Write (NVM Command Set 2.x: Fused Operations): the Write runs
        only if the Compare matched, and the caller lets nothing else of the controller's
        run between them. The completions of the Compare and of the Write."""
        try:
            return self._compare_and_write(first, second)
        except CommandError as err:  # the pair as a whole is refused: both say why
            refused = failed(err)
            return refused, refused

    def _compare_and_write(
        self, first: tuple[int, ...], second: tuple[int, ...]
    ) -> tuple[Completed, Completed]:
        opcodes = (first[0] & 0xFF, second[0] & 0xFF)
        if opcodes != (IoOpcode.COMPARE, IoOpcode.WRITE):
            # Base 3.4.2: a fused operation the controller does not support
            raise CommandError(
                Status.INVALID_FIELD,
                f"fused {opcodes[0]:#x} and {opcodes[1]:#x}: only Compare and Write is supported",
            )
        if (
            first[1] != second[1]
            or first[10:12] != second[10:12]
            or (first[12] ^ second[12]) & 0xFFFF
        ):
            raise CommandError(
                Status.INVALID_FIELD, "Compare and Write: the two commands' LBA ranges differ"
            )
        blocks = (first[12] & 0xFFFF) + 1
        unit = acwu_blocks(self.max_transfer)
        if blocks > unit:
            raise CommandError(Status.INVALID_FIELD, f"Compare and Write: {blocks} blocks > ACWU")
        ns = self.namespaces.get(first[1])
        if ns is not None and ns.passthrough:
            # (the host's kernel passes no fused commands through)
            raise CommandError(
                Status.INVALID_FIELD, "no fused operations on a passthrough namespace"
            )
        try:
            self._check_pointer_type(first[0])
            ns = self._namespace(first[1])
            offset, length = self._data_range(ns, first)
            if first[12] & FUA:
                self._commit(ns)
            expected = copy_from_guest(self.memory, self._segments(first, length, to_guest=False))
        except CommandError as err:
            return failed(err), _FUSED_COMPARE_FAILED
        # The Write's own checks and data, before anything is compared: librbd's
        # compare-and-write takes both buffers at once.
        write_error: CommandError | None = None
        data = b""
        try:
            self._check_pointer_type(second[0])
            if ns.readonly:
                raise CommandError(Status.NAMESPACE_WRITE_PROTECTED)
            data = copy_from_guest(self.memory, self._segments(second, length, to_guest=False))
        except CommandError as err:
            write_error = err
        fua = bool(second[12] & FUA) or not self.write_cache
        atomic = getattr(ns.backend, "compare_and_write", None)
        matched: bool | None = None
        if atomic is not None and write_error is None:
            try:
                matched = atomic(offset, expected, data, fua)
            except OSError as exc:
                return failed(self._host_error(exc, ns, True, offset)), _FUSED_COMPARE_FAILED
            if matched is not None:
                self._count_compare(length)
                if not matched:
                    return _COMPARE_FAILED, _FUSED_COMPARE_FAILED
                self._count_write(length)
                return SUCCESS, SUCCESS
        # The generic pair (librbd did not take the range, or another backend)
        try:
            self._compare_stored(ns, offset, expected)
        except CommandError as err:
            return failed(err), _FUSED_COMPARE_FAILED
        if write_error is not None:
            return SUCCESS, failed(write_error)
        try:
            ns.backend.writev(offset, [memoryview(data)], fua)
        except OSError as exc:
            return SUCCESS, failed(self._host_error(exc, ns, True, offset))
        self._count_write(length)
        return SUCCESS, SUCCESS

    def _compare_stored(self, ns: Namespace, offset: int, expected: bytes | bytearray) -> None:
        """Read the blocks at `offset` and compare them with `expected`: Compare Failure
        if any byte differs."""
        stored = bytearray(len(expected))
        try:
            ns.backend.readv(offset, [memoryview(stored)])
        except OSError as exc:
            raise self._host_error(exc, ns, False, offset) from exc
        self._count_compare(len(expected))
        if stored != expected:  # bytearray on the left: one memcmp
            raise CommandError(Status.COMPARE_FAILURE, "the blocks differ from the host's data")

    def _count_compare(self, length: int) -> None:
        counters = self.counters
        counters.host_read_commands += 1
        counters.bytes_read += length

    def _count_write(self, length: int) -> None:
        counters = self.counters
        counters.host_write_commands += 1
        counters.bytes_written += length

    def verify(self, dw: tuple[int, ...]) -> None:
        """Verify (NVM 3.3.5): read the blocks and transfer nothing. MDTS does not apply;
        VSL is only a recommendation when Verify is supported, so any range is read, in
        pieces of one maximum data transfer."""
        ns = self._namespace(dw[1])
        offset, length = ns.byte_range(dw[10] | (dw[11] << 32), (dw[12] & 0xFFFF) + 1)
        if dw[12] & PRACT:
            raise CommandError(Status.INVALID_FIELD, "Verify with PRINFO.PRACT set")
        if dw[12] & FUA:
            self._commit(ns)
        scratch = self._scratch_buffer()
        done = 0
        try:
            while done < length:
                n = min(len(scratch), length - done)
                ns.backend.readv(offset + done, [scratch[:n]])
                done += n
        except OSError as exc:
            raise self._host_error(exc, ns, False, offset + done) from exc
        # Data Units Read counts what Verify checks (NVM 3.3.5); Host Read Commands does not.
        self.counters.bytes_read += length

    def copy(self, dw: tuple[int, ...]) -> None:
        """Copy (NVM 3.3.2), Source Range Entries format 0h, within the namespace: every
        limit and range is checked before anything moves, then the sources are read
        into one buffer and written with one write (ONCS NVMCSA: the write portion is
        a single write command). A failed Copy reports Dword 0 = 0: no range is
        known to have been copied."""
        ns = self._namespace(dw[1])
        cdw12 = dw[12]
        if ns.readonly:
            raise CommandError(Status.NAMESPACE_WRITE_PROTECTED)
        desfmt = (cdw12 >> 8) & 0xF
        if desfmt != 0:
            raise CommandError(Status.INVALID_FIELD, f"Copy descriptor format {desfmt:#x}")
        count = (cdw12 & 0xFF) + 1
        limits = copy_limits(ns, self.max_transfer)
        if count > limits.msrc + 1:
            raise CommandError(Status.COMMAND_SIZE_LIMIT_EXCEEDED, f"{count} source ranges")
        segments = self._segments(dw, count * _COPY_RANGE_FORMAT_0.size, to_guest=False)
        raw = copy_from_guest(self.memory, segments)
        sources: list[tuple[int, int]] = []
        blocks = 0
        for slba, rpars in _COPY_RANGE_FORMAT_0.iter_unpack(raw):
            nlb = (rpars & 0xFFFF) + 1
            if nlb > limits.mssrl:
                raise CommandError(Status.COMMAND_SIZE_LIMIT_EXCEEDED, f"{nlb} blocks > MSSRL")
            blocks += nlb
            if blocks > limits.mcl:
                raise CommandError(Status.COMMAND_SIZE_LIMIT_EXCEEDED, f"{blocks} blocks > MCL")
            sources.append(ns.byte_range(slba, nlb))
        destination, length = ns.byte_range(dw[10] | (dw[11] << 32), blocks)
        staged = self._scratch_buffer()[:length]
        done = 0
        for offset, n in sources:
            try:
                ns.backend.readv(offset, [staged[done : done + n]])
            except OSError as exc:
                raise self._host_error(exc, ns, False, offset) from exc
            done += n
        fua = bool(cdw12 & FUA) or not self.write_cache
        try:
            ns.backend.writev(destination, [staged], fua)
        except OSError as exc:
            raise self._host_error(exc, ns, True, destination) from exc
        # Data Units Written counts blocks written; Host Write Commands counts Writes only.
        self.counters.bytes_written += length


#: what each half of the one fused operation supported (Compare and Write) is
_FUSED_OPCODES: Final = {CDW0_FUSE_FIRST: IoOpcode.COMPARE, CDW0_FUSE_SECOND: IoOpcode.WRITE}
#: a fused operation's Write when its Compare failed
_FUSED_COMPARE_FAILED: Final = failed(
    CommandError(Status.ABORT_FUSE_FAILED, "its fused Compare failed")
)
_COMPARE_FAILED: Final = failed(
    CommandError(Status.COMPARE_FAILURE, "the blocks differ from the host's data")
)
#: the first command of a fused operation whose second never came
MISSING_FUSED: Final = failed(
    CommandError(Status.ABORT_FUSE_MISSING, "the second command of its fused operation is missing")
)


def _after(views: Sequence[memoryview], skip: int) -> list[memoryview]:
    """The buffers from byte `skip` on (what a short transfer left undone)."""
    rest = []
    for view in views:
        if skip >= view.nbytes:
            skip -= view.nbytes
            continue
        rest.append(view.cast("B")[skip:] if skip else view)
        skip = 0
    return rest
