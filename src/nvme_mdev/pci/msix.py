"""MSI-X (PCI Local Bus 3.0 §6.8.2): the vector table and Pending Bit Array in
BAR4, and delivery of vectors to the client's eventfds.

BAR4 layout: the table at offset 0 (16 bytes per vector), the PBA at the next
4 KiB boundary after the table (so they never share a page), the BAR sized to
the next power of two that holds both (8 KiB for up to 256 vectors).

What masks a vector. QEMU emulates the table and the vector masks itself: guest
table accesses never reach us, and it never sends MASK/UNMASK for MSI-X (its
"can_mask_msix" patch was dropped in 2025). It does forward PBA reads to us
(hw/vfio-user/pci.c, "the server copy is what matters") and writes config space
through, so Function Mask reaches us. A direct client (our own Python client) may
instead program the table through region writes. So a vector is masked when any
of these holds:

- the Function Mask bit of Message Control;
- the client masked it with SET_IRQS MASK;
- its table entry's mask bit, once the client has written the table at all
  (until then the table is QEMU's business and its power-on mask bits, set per
  the spec, would silence every vector);
- it has no eventfd: QEMU attaches a vector's eventfd only when the guest unmasks
  it in QEMU's table, so "no fd" is how a guest-masked vector looks from here.

A masked vector that fires sets its PBA bit instead; when it becomes deliverable
again (unmask, eventfd attached) it fires once and the bit clears.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from nvme_mdev.vfio_user.device import DeviceError, IrqAction, IrqSet

from ..nvme.interrupts import VectorRoutes
from .capabilities import MSIX_MAX_VECTORS

log = logging.getLogger(__name__)

ENTRY_SIZE = 16
ENTRY_ADDRESS_LOW = 0
ENTRY_ADDRESS_HIGH = 4
ENTRY_DATA = 8
ENTRY_VECTOR_CONTROL = 12
VECTOR_CONTROL_MASK = 1

PAGE = 4096

# Per-byte writable bits of one entry: address bits 1:0 are RO 0 (DWORD aligned),
# vector control has only the mask bit (31:1 reserved, no TPH steering tag).
_ENTRY_WRITABLE = bytes([0xFC, 0xFF, 0xFF, 0xFF] + [0xFF] * 8 + [VECTOR_CONTROL_MASK, 0, 0, 0])
# Power-on entry: everything zero except the mask bit (spec: masked at reset).
_ENTRY_DEFAULT = bytes([0] * ENTRY_VECTOR_CONTROL + [VECTOR_CONTROL_MASK, 0, 0, 0])


@dataclass(frozen=True)
class MsixLayout:
    """Where the table and PBA sit in their BAR."""

    vectors: int

    def __post_init__(self) -> None:
        if not 1 <= self.vectors <= MSIX_MAX_VECTORS:
            raise ValueError(f"{self.vectors} MSI-X vectors: must be 1..{MSIX_MAX_VECTORS}")

    @property
    def table_offset(self) -> int:
        return 0

    @property
    def table_size(self) -> int:
        return self.vectors * ENTRY_SIZE

    @property
    def pba_offset(self) -> int:
        return -(-self.table_size // PAGE) * PAGE

    @property
    def pba_size(self) -> int:
        return -(-self.vectors // 64) * 8  # whole QWORDs

    @property
    def bar_size(self) -> int:
        end = self.pba_offset + PAGE  # the PBA (at most 256 bytes) owns its page
        return 1 << (end - 1).bit_length()


class EventfdRoutes:
    """The Python VectorRoutes (nvme/interrupts.py): a route per vector and a pending
    bit, under one lock held across the eventfd write, so that a route change never
    closes (and the kernel reuses) an fd mid-write."""

    def __init__(self, vectors: int) -> None:
        self._lock = threading.Lock()
        self._fds = [-1] * vectors
        self._pending = [False] * vectors
        self._enabled = False

    @property
    def enabled(self) -> bool:
        return self._enabled

    def set_enabled(self, on: bool) -> None:
        self._enabled = on

    def signal(self, vector: int) -> None:
        with self._lock:
            fd = self._fds[vector]
            if fd >= 0:
                _eventfd_write(fd, vector)
            else:
                self._pending[vector] = True

    def route(self, vector: int, fd: int) -> None:
        with self._lock:
            self._fds[vector] = fd
            if fd >= 0 and self._pending[vector]:
                self._pending[vector] = False
                _eventfd_write(fd, vector)

    def pending(self, vector: int) -> bool:
        return self._pending[vector]

    def clear_pending(self) -> None:
        with self._lock:
            self._pending = [False] * len(self._pending)


class Msix:
    """Table, PBA and per-vector eventfds. Thread-safe: `signal()` comes from I/O
    threads while SET_IRQS and region accesses come from the transport. Where each
    vector goes (and its pending bit) lives in `routes`, which the data plane shares."""

    def __init__(self, vectors: int, routes: VectorRoutes | None = None) -> None:
        self.layout = MsixLayout(vectors)
        self._n = vectors
        # One lock for the capability's state; the routes have their own (taken inside).
        self._lock = threading.Lock()
        self._table = bytearray(_ENTRY_DEFAULT * vectors)
        self._table_writable = _ENTRY_WRITABLE * vectors
        self._table_programmed = False
        self._fds = [-1] * vectors
        self._client_masked = [False] * vectors
        #: per vector: the fd it goes to now, or -1 when it is masked (and its PBA bit)
        self.routes: VectorRoutes = routes if routes is not None else EventfdRoutes(vectors)
        self._function_mask = False
        self._capability_enabled = False
        self._client_enabled = False

    @property
    def enabled(self) -> bool:
        """msix_enabled(), read without the lock."""
        return self.routes.enabled

    # --- interrupt delivery (hot path) ----------------------------------------------

    def signal(self, vector: int) -> None:
        """Send `vector`, or mark it pending while it is masked."""
        if not 0 <= vector < self._n:
            raise IndexError(f"MSI-X vector {vector}")
        self.routes.signal(vector)

    # --- state from config space ----------------------------------------------------

    def set_control(self, *, enable: bool, function_mask: bool) -> None:
        """Message Control as last written by the host."""
        with self._lock:
            self._capability_enabled = enable
            self._update_enabled()
            if function_mask != self._function_mask:
                self._function_mask = function_mask
                self._refresh(range(self._n))

    @property
    def client_enabled(self) -> bool:
        """Whether the client has set up MSI-X eventfds (SET_IRQS) since the last disable."""
        return self._client_enabled

    def pending(self, vector: int) -> bool:
        return self.routes.pending(vector)

    def _pba(self) -> int:
        return sum(1 << v for v in range(self._n) if self.routes.pending(v))

    # --- BAR4 accesses --------------------------------------------------------------

    def read(self, offset: int, size: int) -> bytes:
        out = bytearray(size)
        lay = self.layout
        with self._lock:
            _copy_overlap(out, offset, self._table, lay.table_offset)
            pba = self._pba().to_bytes(lay.pba_size, "little")
            _copy_overlap(out, offset, pba, lay.pba_offset)
        return bytes(out)

    def write(self, offset: int, data: bytes) -> None:
        """Table writes take effect per byte mask; the PBA is read-only; holes ignore writes."""
        lo = max(offset, self.layout.table_offset)
        hi = min(offset + len(data), self.layout.table_offset + self.layout.table_size)
        if lo >= hi:
            return
        with self._lock:
            table, writable = self._table, self._table_writable
            for pos in range(lo, hi):
                byte = data[pos - offset]
                table[pos] = (table[pos] & ~writable[pos]) | (byte & writable[pos])
            if not self._table_programmed:
                self._table_programmed = True
                self._refresh(range(self._n))
            else:
                self._refresh(range(lo // ENTRY_SIZE, (hi - 1) // ENTRY_SIZE + 1))

    def entry(self, vector: int) -> tuple[int, int, int]:
        """(message address, message data, vector control) of a table entry."""
        base = vector * ENTRY_SIZE
        with self._lock:
            raw = bytes(self._table[base : base + ENTRY_SIZE])
        return (
            int.from_bytes(raw[0:8], "little"),
            int.from_bytes(raw[8:12], "little"),
            int.from_bytes(raw[12:16], "little"),
        )

    # --- SET_IRQS (index MSI-X) ------------------------------------------------------

    def set_irqs(self, request: IrqSet) -> None:
        fds = list(request.fds) if request.fds is not None else None
        try:
            targets = self._validate(request, fds)
        except DeviceError:
            _close_all(fd for fd in fds or () if fd >= 0)
            raise
        with self._lock:
            if request.action == IrqAction.TRIGGER:
                if fds is not None:
                    self._attach(request.start, fds or [-1] * request.count)
                elif request.count == 0 and request.flags is None:
                    self._disable()
                else:
                    for vector in targets:
                        self._signal_locked(vector)
            else:
                masked = request.action == IrqAction.MASK
                for vector in targets:
                    self._client_masked[vector] = masked
                self._refresh(targets)

    def _validate(self, request: IrqSet, fds: list[int] | None) -> list[int]:
        start, count = request.start, request.count
        if start < 0 or count < 0 or (count and start + count > self._n):
            raise DeviceError(errno.EINVAL, f"MSI-X vectors {start}+{count} of {self._n}")
        if fds is not None:
            if request.action != IrqAction.TRIGGER:
                raise DeviceError(errno.EINVAL, "MSI-X mask/unmask eventfds are not supported")
            # An all "-1" chunk arrives with no fds at all (QEMU sends none for it).
            if len(fds) not in (0, count):
                raise DeviceError(errno.EINVAL, f"{len(fds)} eventfds for {count} vectors")
            return []
        if request.flags is not None:
            if len(request.flags) != count:
                raise DeviceError(errno.EINVAL, f"{len(request.flags)} flags for {count}")
            return [start + i for i, flag in enumerate(request.flags) if flag]
        return list(range(start, start + count))

    def _attach(self, start: int, fds: Sequence[int]) -> None:
        # QEMU enables MSI-X with one "-1" eventfd for vector 0 and then attaches
        # vectors one at a time as the guest unmasks them: any eventfd request
        # (even all -1) therefore means "MSI-X on".
        old: list[int] = []
        for vector, fd in enumerate(fds, start):
            if self._fds[vector] != fd:
                old.append(self._fds[vector])
                self._fds[vector] = fd
        self._client_enabled = True
        self._update_enabled()
        self._refresh(range(start, start + len(fds)))  # stop routing to old fds first
        _close_all(fd for fd in old if fd >= 0 and fd not in self._fds)

    def _disable(self) -> None:
        # Pending bits stay: QEMU without dynamic allocation disables and re-enables
        # the whole index to add one vector, and a pending interrupt must survive that.
        old, self._fds = self._fds, [-1] * self._n
        self._client_masked = [False] * self._n
        self._client_enabled = False
        self._update_enabled()
        self._refresh(range(self._n))
        _close_all(fd for fd in old if fd >= 0)

    # --- upgrade in place ------------------------------------------------------------

    def handover_state(self, fds: list[int]) -> dict[str, Any]:
        """Table, pending bits and the client's eventfds (appended to `fds`) and masks.
        Message Control lives in config space."""
        with self._lock:
            routes = []
            for fd in self._fds:
                routes.append(len(fds) if fd >= 0 else -1)
                if fd >= 0:
                    fds.append(fd)
            return {
                "table": bytes(self._table).hex(),
                "table_programmed": self._table_programmed,
                "eventfds": routes,
                "client_masked": list(self._client_masked),
                "client_enabled": self._client_enabled,
                "pending": [v for v in range(self._n) if self.routes.pending(v)],
            }

    def restore(
        self, state: dict[str, Any], fds: Sequence[int], *, enable: bool, function_mask: bool
    ) -> None:
        """A predecessor's state (handover_state) on a fresh object; pending vectors
        that are deliverable now are sent (an interrupt the guest may already have had
        is harmless, one lost is not)."""
        table = bytes.fromhex(state["table"])
        if len(table) != len(self._table) or len(state["eventfds"]) != self._n:
            raise ValueError("MSI-X state for another number of vectors")
        with self._lock:
            self._table[:] = table
            self._table_programmed = bool(state["table_programmed"])
            self._fds = [fds[i] if i >= 0 else -1 for i in state["eventfds"]]
            self._client_masked = [bool(m) for m in state["client_masked"]]
            self._client_enabled = bool(state["client_enabled"])
            self._capability_enabled = enable
            self._function_mask = function_mask
            self._update_enabled()
            for vector in range(self._n):
                self.routes.route(vector, -1)
            for vector in state["pending"]:
                self.routes.signal(vector)  # (routed nowhere: marks it pending)
            self._refresh(range(self._n))

    # --- resets ---------------------------------------------------------------------

    def reset_function_state(self) -> None:
        """FLR: table, PBA and Message Control back to power-on. The client's eventfds
        and masks are its own plumbing, not function state, and stay: after a guest FLR
        QEMU does not send them again."""
        with self._lock:
            self._table[:] = _ENTRY_DEFAULT * self._n
            self._table_programmed = False
            self.routes.clear_pending()
            self._function_mask = False
            self._capability_enabled = False
            self._update_enabled()
            self._refresh(range(self._n))

    def detach_all(self) -> None:
        """Close every eventfd and forget the client's MSI-X setup."""
        with self._lock:
            self._disable()

    # --- internals (lock held) ------------------------------------------------------

    def _signal_locked(self, vector: int) -> None:
        self.routes.signal(vector)

    def _update_enabled(self) -> None:
        self.routes.set_enabled(self._capability_enabled or self._client_enabled)

    def _refresh(self, vectors: Iterable[int]) -> None:
        """Recompute where vectors go; deliver those that became deliverable while pending."""
        table, fds = self._table, self._fds
        for vector in vectors:
            control = table[vector * ENTRY_SIZE + ENTRY_VECTOR_CONTROL]
            masked = (
                self._function_mask
                or self._client_masked[vector]
                or (self._table_programmed and bool(control & VECTOR_CONTROL_MASK))
            )
            self.routes.route(vector, -1 if masked else fds[vector])


def _eventfd_write(fd: int, vector: int) -> None:
    try:
        os.eventfd_write(fd, 1)
    except BlockingIOError:
        pass  # a full counter: the client has not read the interrupts it has
    except OSError as exc:  # the client's fd is broken; nothing the guest can do
        log.warning("MSI-X vector %d: eventfd %d write failed: %s", vector, fd, exc)


def _close_all(fds: Iterable[int]) -> None:
    for fd in set(fds):
        try:
            os.close(fd)
        except OSError as exc:
            log.warning("closing eventfd %d: %s", fd, exc)


def _copy_overlap(out: bytearray, out_offset: int, src: bytes | bytearray, src_offset: int) -> None:
    """Copy the part of `src` (placed at `src_offset`) that overlaps `out` (at `out_offset`)."""
    lo = max(out_offset, src_offset)
    hi = min(out_offset + len(out), src_offset + len(src))
    if lo < hi:
        out[lo - out_offset : hi - out_offset] = src[lo - src_offset : hi - src_offset]
