"""INTx: a level-triggered interrupt pin carried over an edge-like eventfd.

How QEMU's vfio-pci client runs INTx (hw/vfio/pci.c, hw/vfio/region.c;
the same code serves vfio-user):

1. Enable: SET_IRQS index INTX, DATA_EVENTFD|ACTION_TRIGGER, start 0, count 1.
2. The device writes the eventfd. QEMU (vfio_intx_interrupt) asserts the guest's
   pin and marks it pending. QEMU never sends MASK here: the device is expected to
   have masked itself (kernel vfio's AUTOMASKED behaviour), so it must not signal
   again until unmasked.
3. QEMU takes the guest's next access to any BAR of the device, *after* that
   access completed (vfio_region_read/write end with vfio_eoi), as the EOI: it
   deasserts the pin and sends SET_IRQS INTX ACTION_UNMASK, DATA_NONE, count 1.
4. On unmask, a level still asserted fires again: the guest sees a new interrupt.
5. Disable: SET_IRQS INTX DATA_NONE|ACTION_TRIGGER, count 0 (also before every
   switch to MSI/MSI-X and around DEVICE_RESET, after which it enables INTx anew).

With KVM, QEMU first asks for a resample eventfd (ACTION_UNMASK with
DATA_EVENTFD). We refuse that with EINVAL; QEMU then falls back to the
userspace path above (vfio_intx_enable_kvm's failure branch).

Because the EOI is inferred from a BAR access, a guest that consumes completions
without touching BAR0 (shadow doorbells that skip the MMIO write) leaves the pin
asserted until its next BAR access.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
from collections.abc import Iterable, Sequence
from typing import Any

from nvme_mdev.vfio_user.device import DeviceError, IrqAction, IrqSet

log = logging.getLogger(__name__)


class IntxPin:
    """INTA# of our function. Thread-safe; its lock is held only around eventfd writes
    and never while calling out."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._fd = -1
        self._level = False
        #: the vfio-level mask: set when we signal (automask) or by MASK, cleared by UNMASK
        self._masked = False
        #: Command.Interrupt Disable, or MSI-X enabled: the pin must stay quiet
        self._disabled = False

    @property
    def level(self) -> bool:
        """The function's interrupt state (the Status register's Interrupt Status bit)."""
        return self._level

    @property
    def masked(self) -> bool:
        return self._masked

    @property
    def fd(self) -> int:
        return self._fd

    def set_level(self, asserted: bool) -> None:
        with self._lock:
            self._level = asserted
            self._deliver()

    def set_disabled(self, disabled: bool) -> None:
        with self._lock:
            self._disabled = disabled
            self._deliver()

    def set_irqs(self, request: IrqSet) -> None:
        fds = list(request.fds) if request.fds is not None else None
        try:
            fire = self._validate(request, fds)
        except DeviceError:
            _close(fd for fd in fds or () if fd >= 0)
            raise
        with self._lock:
            if request.action == IrqAction.TRIGGER:
                if fds is not None:
                    self._attach(fds[0] if fds else -1)
                elif request.count == 0 and request.flags is None:
                    self._attach(-1)  # DATA_NONE, count 0: disable
                elif fire and self._fd >= 0:
                    _signal(self._fd)  # software trigger: the eventfd only, no state
            elif fire:
                self._masked = request.action == IrqAction.MASK
                self._deliver()

    def _validate(self, request: IrqSet, fds: list[int] | None) -> bool:
        """Returns whether the request selects the (only) vector."""
        if request.start != 0 or request.count not in (0, 1):
            raise DeviceError(errno.EINVAL, f"INTx vector {request.start}+{request.count}")
        if fds is not None:
            if request.action != IrqAction.TRIGGER:
                # The KVM resample (unmask) eventfd: not offered, QEMU falls back.
                raise DeviceError(errno.EINVAL, "INTx mask/unmask eventfds are not supported")
            if len(fds) > request.count:
                raise DeviceError(errno.EINVAL, f"{len(fds)} eventfds for {request.count}")
            return request.count == 1
        if request.flags is not None:
            if len(request.flags) != request.count:
                raise DeviceError(errno.EINVAL, "INTx flags do not match count")
            return any(request.flags)
        return request.count == 1

    def _attach(self, fd: int) -> None:
        old, self._fd = self._fd, fd
        if old != fd:
            # A fresh enable starts unmasked (as kernel vfio does); a level already
            # high is delivered at once.
            self._masked = False
            self._deliver()
            if old >= 0:
                _close([old])

    def handover_state(self, fds: list[int]) -> dict[str, Any]:
        with self._lock:
            eventfd = -1
            if self._fd >= 0:
                eventfd = len(fds)
                fds.append(self._fd)
            return {"eventfd": eventfd, "level": self._level, "masked": self._masked}

    def restore(self, state: dict[str, Any], fds: Sequence[int]) -> None:
        with self._lock:
            self._fd = fds[state["eventfd"]] if state["eventfd"] >= 0 else -1
            self._level = bool(state["level"])
            self._masked = bool(state["masked"])

    def reset_function_state(self) -> None:
        """FLR: the pin drops; the client's eventfd and mask are its plumbing and stay."""
        with self._lock:
            self._level = False

    def detach(self) -> None:
        with self._lock:
            self._attach(-1)
            self._level = False

    def _deliver(self) -> None:
        if self._level and not self._masked and not self._disabled and self._fd >= 0:
            self._masked = True  # automask until the client's UNMASK (its EOI)
            _signal(self._fd)


def _signal(fd: int) -> None:
    try:
        os.eventfd_write(fd, 1)
    except BlockingIOError:
        pass  # a full counter: the client has not read the interrupts it has
    except OSError as exc:
        log.warning("INTx eventfd %d write failed: %s", fd, exc)


def _close(fds: Iterable[int]) -> None:
    for fd in set(fds):
        try:
            os.close(fd)
        except OSError as exc:
            log.warning("closing eventfd %d: %s", fd, exc)
