"""The NVM command set's I/O commands (NVM Command Set 3.2): Read, Write, Flush,
Write Zeroes, Dataset Management.

Each handler validates the command against the namespace and the controller's
limits, then moves data between the backend and zero-copy views of guest
memory. Failures are raised as CommandError; the caller posts the completion.
"""

from __future__ import annotations

import errno
import struct
from collections.abc import Callable
from dataclasses import dataclass

from ..guest_memory import GuestMemory
from .errors import CommandError
from .namespace import Namespace
from .prp import copy_from_guest, copy_to_guest, prp_segments, segment_views
from .spec import IoOpcode, Status

BROADCAST_NSID = 0xFFFFFFFF
_DSM_RANGE = struct.Struct("<IIQ")  # context attributes, NLB, SLBA
DSM_MAX_RANGES = 256


@dataclass
class IoCounters:
    """What SMART / Health reports about host I/O (Base 5.16.1.3)."""

    host_read_commands: int = 0
    host_write_commands: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    media_errors: int = 0


class IoCommandSet:
    """Executes I/O commands against a set of namespaces."""

    def __init__(
        self,
        memory: GuestMemory,
        namespaces: dict[int, Namespace],
        max_transfer: int,
        counters: IoCounters,
    ) -> None:
        self.memory = memory
        self.namespaces = namespaces
        self.max_transfer = max_transfer
        self.counters = counters
        #: Volatile Write Cache feature (WCE): while it is off every write is made durable
        #: before it completes, as if FUA were set. The owner of the feature installs this.
        self.write_cache_enabled: Callable[[], bool] = _always
        self._handlers: dict[int, Callable[[tuple[int, ...]], None]] = {
            IoOpcode.READ: self.read,
            IoOpcode.WRITE: self.write,
            IoOpcode.FLUSH: self.flush,
            IoOpcode.WRITE_ZEROES: self.write_zeroes,
            IoOpcode.DATASET_MANAGEMENT: self.dataset_management,
        }

    def execute(self, dw: tuple[int, ...]) -> None:
        """Run the command in SQE dwords `dw`; raises CommandError on failure."""
        handler = self._handlers.get(dw[0] & 0xFF)
        if handler is None:
            raise CommandError(Status.INVALID_OPCODE)
        if dw[0] & 0xC300:  # FUSE (9:8) and PSDT (15:14): no fused commands, PRPs only
            raise CommandError(Status.INVALID_FIELD, "fused command or SGL")
        handler(dw)

    def _namespace(self, nsid: int) -> Namespace:
        ns = self.namespaces.get(nsid)
        if ns is None:
            raise CommandError(Status.INVALID_NAMESPACE, f"nsid {nsid}")
        return ns

    def _data_range(self, ns: Namespace, dw: tuple[int, ...]) -> tuple[int, int]:
        slba = dw[10] | (dw[11] << 32)
        nlb = (dw[12] & 0xFFFF) + 1
        offset, length = ns.byte_range(slba, nlb)
        if length > self.max_transfer:
            raise CommandError(Status.INVALID_FIELD, f"{length} bytes > MDTS")
        return offset, length

    def read(self, dw: tuple[int, ...]) -> None:
        ns = self._namespace(dw[1])
        offset, length = self._data_range(ns, dw)
        segments = prp_segments(self.memory, dw[6] | (dw[7] << 32), dw[8] | (dw[9] << 32), length)
        views = segment_views(self.memory, segments, to_guest=True)
        try:
            if views is not None:
                ns.backend.readv(offset, views)
            else:
                bounce = bytearray(length)
                ns.backend.readv(offset, [memoryview(bounce)])
                copy_to_guest(self.memory, segments, bounce)
        except OSError as exc:
            self.counters.media_errors += 1
            raise CommandError(Status.UNRECOVERED_READ_ERROR, str(exc)) from exc
        counters = self.counters
        counters.host_read_commands += 1
        counters.bytes_read += length

    def write(self, dw: tuple[int, ...]) -> None:
        ns = self._namespace(dw[1])
        offset, length = self._data_range(ns, dw)
        if ns.readonly:
            raise CommandError(Status.NAMESPACE_WRITE_PROTECTED)
        fua = bool(dw[12] & (1 << 30)) or not self.write_cache_enabled()
        segments = prp_segments(self.memory, dw[6] | (dw[7] << 32), dw[8] | (dw[9] << 32), length)
        views = segment_views(self.memory, segments, to_guest=False)
        if views is None:
            views = [memoryview(copy_from_guest(self.memory, segments))]
        try:
            ns.backend.writev(offset, views, fua)
        except OSError as exc:
            raise _write_error(exc, self.counters) from exc
        counters = self.counters
        counters.host_write_commands += 1
        counters.bytes_written += length

    def flush(self, dw: tuple[int, ...]) -> None:
        nsid = dw[1]
        targets = self.namespaces.values() if nsid == BROADCAST_NSID else [self._namespace(nsid)]
        try:
            for ns in targets:
                ns.backend.flush()
        except OSError as exc:
            raise _write_error(exc, self.counters) from exc

    def write_zeroes(self, dw: tuple[int, ...]) -> None:
        ns = self._namespace(dw[1])
        slba = dw[10] | (dw[11] << 32)
        offset, length = ns.byte_range(slba, (dw[12] & 0xFFFF) + 1)
        if ns.readonly:
            raise CommandError(Status.NAMESPACE_WRITE_PROTECTED)
        deallocate = bool(dw[12] & (1 << 25))
        try:
            ns.backend.write_zeroes(offset, length, deallocate)
            if dw[12] & (1 << 30) or not self.write_cache_enabled():  # FUA or write-through
                ns.backend.flush()
        except OSError as exc:
            raise _write_error(exc, self.counters) from exc

    def dataset_management(self, dw: tuple[int, ...]) -> None:
        ns = self._namespace(dw[1])
        count = (dw[10] & 0xFF) + 1
        segments = prp_segments(
            self.memory, dw[6] | (dw[7] << 32), dw[8] | (dw[9] << 32), count * _DSM_RANGE.size
        )
        raw = copy_from_guest(self.memory, segments)
        ranges = [ns.byte_range(slba, nlb) for _, nlb, slba in _DSM_RANGE.iter_unpack(raw) if nlb]
        if not dw[11] & (1 << 2):  # only the deallocate attribute asks us to act
            return
        if ns.readonly:
            raise CommandError(Status.NAMESPACE_WRITE_PROTECTED)
        try:
            for offset, length in ranges:
                ns.backend.deallocate(offset, length)
        except OSError as exc:
            raise _write_error(exc, self.counters) from exc


def _always() -> bool:
    return True


def _write_error(exc: OSError, counters: IoCounters) -> CommandError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return CommandError(Status.CAPACITY_EXCEEDED, str(exc))
    counters.media_errors += 1
    return CommandError(Status.WRITE_FAULT, str(exc))
