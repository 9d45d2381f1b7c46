"""The PCI function of an NVMe controller: what the vfio-user server serves
(`vfio_user.device.Device`) and what the controller signals through
(`nvme.interrupts.InterruptSink`).

Regions (vfio-pci indexes):

====== ============================================================ ==========
index  contents                                                     size
====== ============================================================ ==========
0      BAR0/1: 64-bit non-prefetchable memory, controller registers  bar0_size
       and doorbells, forwarded to the `Bar0Handler`
1-3    (BAR1 is BAR0's upper half; BAR2/3 unimplemented)            0
4      BAR4: 32-bit non-prefetchable memory, MSI-X table at 0 and     8 KiB for
       PBA at the next 4 KiB boundary                                ≤256 vectors
5      unimplemented                                                0
6      expansion ROM: none                                          0
7      configuration space                                          4096
8      VGA: none                                                    0
====== ============================================================ ==========

Interrupts: INTx (1 vector, level-triggered, see intx.py) and MSI-X
(`num_msix_vectors`). MSI is not offered.
"""

from __future__ import annotations

import contextlib
import errno
import os
import threading
from collections.abc import Callable, Sequence
from typing import Any, Final, Protocol

from nvme_mdev.vfio_user.device import (
    DeviceError,
    IrqAction,
    IrqIndex,
    IrqSet,
    MmapArea,
    Region,
    RegionIndex,
    no_quiesce,
)

from ..nvme.interrupts import VectorRoutes
from . import capabilities as caps
from .config_space import (
    CONFIG_SPACE_SIZE,
    MSIX_BAR_INDEX,
    Command,
    ConfigSpace,
    HeaderReg,
    Status,
    define_type0_header,
    written_value,
)
from .intx import IntxPin
from .msix import Msix

QuiesceProvider = Callable[[], contextlib.AbstractContextManager[None]]

# VFIO_IRQ_INFO_* flags (linux/vfio.h), for the server's GET_IRQ_INFO replies.
IRQ_INFO_EVENTFD: Final = 1 << 0
IRQ_INFO_MASKABLE: Final = 1 << 1
IRQ_INFO_AUTOMASKED: Final = 1 << 2
IRQ_INFO_NORESIZE: Final = 1 << 3

_PCIE_DEVCTL = caps.PCI_EXPRESS_OFFSET + caps.PCIE_DEVICE_CONTROL
_MSIX_CONTROL = caps.MSIX_OFFSET + caps.MSIX_MESSAGE_CONTROL
_PMCSR = caps.POWER_MANAGEMENT_OFFSET + caps.PM_CONTROL_STATUS


class Bar0Handler(Protocol):
    """The NVMe controller as BAR0 sees it. Accesses arrive naturally aligned, 1, 2,
    4 or 8 bytes wide; values are little-endian integers."""

    def mmio_read(self, offset: int, size: int) -> int: ...

    def mmio_write(self, offset: int, size: int, value: int) -> None: ...

    def reset(self) -> None:
        """Controller Level Reset, as part of a function reset (FLR, DEVICE_RESET)."""
        ...


class NvmePciFunction:
    """One PCI function: config space, BAR0 forwarding, MSI-X and INTx.

    `msix_enabled()` is true while the MSI-X Enable bit is set in config space OR the
    client has MSI-X eventfds set up (any SET_IRQS MSI-X DATA_EVENTFD/TRIGGER since
    the last DATA_NONE/TRIGGER count-0 disable). QEMU does both (it writes config
    through, then sets eventfds); a direct client may do either. While it is true,
    INTx stays quiet, as PCI requires.

    `bar0` may be None at construction because the controller needs this object as
    its InterruptSink first; attach it with `attach_bar0()` before serving.
    """

    def __init__(
        self,
        bar0: Bar0Handler | None,
        bar0_size: int,
        num_msix_vectors: int,
        *,
        quiesce: QuiesceProvider | None = None,
        bar0_mmap_fd: int | None = None,
        bar0_mmap_areas: Sequence[MmapArea] = (),
        routes: VectorRoutes | None = None,
    ) -> None:
        """`routes`: where MSI-X vectors go, shared with the data plane (its own kind:
        dataplane.make_vector_routes); a Python one by default."""
        self._bar0 = bar0
        self._quiesce = quiesce
        self._msix = Msix(num_msix_vectors, routes)
        self.routes: VectorRoutes = self._msix.routes
        self._intx = IntxPin()
        lay = self._msix.layout
        self._config = ConfigSpace()
        define_type0_header(self._config, bar0_size=bar0_size, msix_bar_size=lay.bar_size)
        caps.define_capabilities(
            self._config,
            msix_vectors=num_msix_vectors,
            msix_bir=MSIX_BAR_INDEX,
            table_offset=lay.table_offset,
            pba_offset=lay.pba_offset,
        )
        self._config.set_defaults()
        # Guards config space and the gating derived from it; taken before the
        # MSI-X/INTx locks, never held while calling the controller.
        self._config_lock = threading.Lock()

        sizes = {RegionIndex.BAR0: bar0_size, RegionIndex.BAR4: lay.bar_size}
        sizes[RegionIndex.CONFIG] = CONFIG_SPACE_SIZE
        regions = [
            Region(index=i, size=sizes.get(RegionIndex(i), 0)) for i in range(len(RegionIndex))
        ]
        for region in regions:
            if region.size == 0:
                region.read = region.write = False
        regions[RegionIndex.BAR0].mmap_fd = bar0_mmap_fd
        regions[RegionIndex.BAR0].mmap_areas = tuple(bar0_mmap_areas)
        self.regions: Sequence[Region] = tuple(regions)
        self.irq_counts: Sequence[int] = (1, 0, num_msix_vectors, 0, 0)
        #: suggested VFIO_IRQ_INFO flags per IRQ index. INTx is automasked (see
        #: intx.py). MSI-X omits NORESIZE: vectors attach one at a time without
        #: disturbing the others, which is what QEMU's dynamic allocation wants.
        self.irq_info_flags: Sequence[int] = (
            IRQ_INFO_EVENTFD | IRQ_INFO_MASKABLE | IRQ_INFO_AUTOMASKED,
            0,
            IRQ_INFO_EVENTFD | IRQ_INFO_MASKABLE,
            0,
            0,
        )

    def attach_bar0(self, bar0: Bar0Handler) -> None:
        self._bar0 = bar0

    # --- InterruptSink -------------------------------------------------------------

    def msix_enabled(self) -> bool:
        return self._msix.enabled

    def signal(self, vector: int) -> None:
        self._msix.signal(vector)

    def set_intx(self, asserted: bool) -> None:
        self._intx.set_level(asserted)

    # --- Device: regions ------------------------------------------------------------

    def region_read(self, index: int, offset: int, count: int) -> bytes:
        self._check_access(index, offset, count)
        if index == RegionIndex.BAR0:
            return self._bar0_read(offset, count)
        if index == RegionIndex.CONFIG:
            return self._config_read(offset, count)
        return self._msix.read(offset, count)  # BAR4: the only other non-empty region

    def region_write(self, index: int, offset: int, data: bytes) -> None:
        self._check_access(index, offset, len(data))
        if index == RegionIndex.BAR0:
            self._bar0_write(offset, data)
        elif index == RegionIndex.CONFIG:
            self._config_write(offset, data)
        else:
            self._msix.write(offset, data)

    def _check_access(self, index: int, offset: int, count: int) -> None:
        if not 0 <= index < len(self.regions):
            raise DeviceError(errno.EINVAL, f"no region {index}")
        size = self.regions[index].size
        if size == 0 or offset < 0 or count < 0 or offset + count > size:
            raise DeviceError(errno.EINVAL, f"region {index}: {offset:#x}+{count} beyond {size:#x}")

    # --- BAR0 --------------------------------------------------------------------------

    def _bar0_read(self, offset: int, count: int) -> bytes:
        bar0 = self._handler()
        if count in (4, 8) and offset % count == 0:
            value = bar0.mmio_read(offset, count) & ((1 << 8 * count) - 1)
            return value.to_bytes(count, "little")
        return b"".join(
            (bar0.mmio_read(pos, size) & ((1 << 8 * size) - 1)).to_bytes(size, "little")
            for pos, size in _natural_pieces(offset, count)
        )

    def _bar0_write(self, offset: int, data: bytes) -> None:
        bar0 = self._handler()
        count = len(data)
        if count in (4, 8) and offset % count == 0:  # the doorbell path: no loop
            bar0.mmio_write(offset, count, int.from_bytes(data, "little"))
            return
        for pos, size in _natural_pieces(offset, count):
            start = pos - offset
            bar0.mmio_write(pos, size, int.from_bytes(data[start : start + size], "little"))

    def _handler(self) -> Bar0Handler:
        if self._bar0 is None:
            raise DeviceError(errno.EIO, "no controller attached to BAR0")
        return self._bar0

    # --- config space ------------------------------------------------------------------

    def _config_read(self, offset: int, count: int) -> bytes:
        with self._config_lock:
            data = bytearray(self._config.read(offset, count))
        status = HeaderReg.STATUS - offset
        if 0 <= status < count and self._intx.level:  # Interrupt Status follows the pin
            data[status] |= Status.INTERRUPT_STATUS
        return bytes(data)

    def _config_write(self, offset: int, data: bytes) -> None:
        with self._config_lock:
            self._config.write(offset, data)
            control = self._config.load(_MSIX_CONTROL, 2)
            self._msix.set_control(
                enable=bool(control & caps.MSIX_ENABLE),
                function_mask=bool(control & caps.MSIX_FUNCTION_MASK),
            )
            self._update_intx_gate()
        flr = written_value(offset, data, _PCIE_DEVCTL, 2)
        if flr is not None and flr[0] & caps.DeviceControl.INITIATE_FLR:
            self.function_level_reset()

    def _update_intx_gate(self) -> None:
        command = self._config.load(HeaderReg.COMMAND, 2)
        self._intx.set_disabled(bool(command & Command.INTX_DISABLE) or self._msix.enabled)

    # --- Device: interrupts ------------------------------------------------------------

    def set_irqs(self, request: IrqSet) -> None:
        if request.index == IrqIndex.INTX:
            self._intx.set_irqs(request)
        elif request.index == IrqIndex.MSIX:
            self._msix.set_irqs(request)
            with self._config_lock:
                self._update_intx_gate()
        elif (
            0 <= request.index < len(self.irq_counts)
            and request.action == IrqAction.TRIGGER
            and request.count == 0
            and request.fds is None
            and request.flags is None
        ):
            pass  # disabling an index we do not offer (MSI, ERR, REQ): nothing to do
        else:
            for fd in request.fds or ():  # ours once passed: do not leak them
                if fd >= 0:
                    with contextlib.suppress(OSError):
                        os.close(fd)
            raise DeviceError(errno.EINVAL, f"IRQ index {request.index} not supported")

    # --- resets ------------------------------------------------------------------------

    def function_level_reset(self) -> None:
        """FLR (PCIe Base §6.6.2), from Device Control's Initiate FLR: controller reset,
        config space, MSI-X table/PBA and the INTx level back to power-on. The client's
        eventfds stay: QEMU passes a guest's FLR write through and, its own emulated
        MSI-X state unchanged, does not send them again."""
        self._msix.reset_function_state()
        self._intx.reset_function_state()
        with self._config_lock:
            self._config.reset()
            self._update_intx_gate()
        if self._bar0 is not None:
            self._bar0.reset()

    def reset(self) -> None:
        """DEVICE_RESET or the client going away: an FLR plus the client's interrupt
        setup torn down (eventfds closed, masks cleared). QEMU disables interrupts
        before DEVICE_RESET and enables INTx again after it."""
        self._msix.detach_all()
        self._intx.detach()
        self.function_level_reset()

    def close(self) -> None:
        """Release every eventfd (daemon shutdown)."""
        self._msix.detach_all()
        self._intx.detach()

    def quiesced(self) -> contextlib.AbstractContextManager[None]:
        return self._quiesce() if self._quiesce is not None else no_quiesce()

    # --- upgrade in place ------------------------------------------------------------------

    def handover_state(self, fds: list[int]) -> dict[str, Any]:
        """Config space, MSI-X and INTx as the host left them, with the client's
        eventfds appended to `fds`."""
        with self._config_lock:
            config = self._config.contents()
        return {
            "config": config.hex(),
            "msix": self._msix.handover_state(fds),
            "intx": self._intx.handover_state(fds),
        }

    def restore(self, state: dict[str, Any], fds: Sequence[int]) -> None:
        self._intx.restore(state["intx"], fds)
        with self._config_lock:
            self._config.restore(bytes.fromhex(state["config"]))
            control = self._config.load(_MSIX_CONTROL, 2)
            self._msix.restore(
                state["msix"],
                fds,
                enable=bool(control & caps.MSIX_ENABLE),
                function_mask=bool(control & caps.MSIX_FUNCTION_MASK),
            )
            self._update_intx_gate()

    # --- state for the rest of the device ---------------------------------------------

    @property
    def config(self) -> ConfigSpace:
        return self._config

    @property
    def msix(self) -> Msix:
        return self._msix

    @property
    def intx(self) -> IntxPin:
        return self._intx

    def bus_master_enabled(self) -> bool:
        """Command.Bus Master: whether the function may DMA (not enforced here)."""
        with self._config_lock:
            return bool(self._config.load(HeaderReg.COMMAND, 2) & Command.BUS_MASTER)

    def power_state(self) -> caps.PowerState:
        with self._config_lock:
            pmcsr = self._config.load(_PMCSR, 2)
        return caps.PowerState(pmcsr & caps.PMCSR_POWER_STATE_MASK)


def _natural_pieces(offset: int, count: int) -> list[tuple[int, int]]:
    """Split an access into naturally aligned 8/4/2/1-byte pieces, largest first."""
    pieces = []
    pos, end = offset, offset + count
    while pos < end:
        size = 8
        while pos % size or pos + size > end:
            size >>= 1
        pieces.append((pos, size))
        pos += size
    return pieces
