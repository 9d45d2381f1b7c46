"""Regions, BAR0 forwarding, resets and IRQ request validation."""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator

import pytest
from pci_helpers import (
    BAR0_SIZE,
    VECTORS,
    FakeBar0,
    cfg_read,
    cfg_write,
    eventfd,
    fired,
    is_open,
    make_function,
    set_eventfds,
)

from nvme_mdev.nvme.interrupts import InterruptSink
from nvme_mdev.pci import NvmePciFunction
from nvme_mdev.pci import capabilities as caps
from nvme_mdev.pci.config_space import Command, HeaderReg
from nvme_mdev.vfio_user.device import (
    Device,
    DeviceError,
    IrqAction,
    IrqIndex,
    IrqSet,
    MmapArea,
    RegionIndex,
)

DEVCTL = caps.PCI_EXPRESS_OFFSET + caps.PCIE_DEVICE_CONTROL
MSIX_CONTROL = caps.MSIX_OFFSET + caps.MSIX_MESSAGE_CONTROL


def test_satisfies_both_protocols() -> None:
    fn, _ = make_function()
    device: Device = fn
    sink: InterruptSink = fn
    assert tuple(device.irq_counts) == (1, 0, VECTORS, 0, 0)
    assert not sink.msix_enabled()


def test_region_layout() -> None:
    fn, _ = make_function()
    sizes = [r.size for r in fn.regions]
    assert sizes == [BAR0_SIZE, 0, 0, 0, fn.msix.layout.bar_size, 0, 0, 4096, 0]
    assert [r.index for r in fn.regions] == list(range(9))
    for region in fn.regions:
        assert region.read == region.write == (region.size > 0)
    assert fn.regions[RegionIndex.BAR0].mmap_fd is None


def test_bar0_mmap_areas_pass_through() -> None:
    area = MmapArea(0x1000, 0x1000)
    fn = NvmePciFunction(FakeBar0(), BAR0_SIZE, 4, bar0_mmap_fd=99, bar0_mmap_areas=[area])
    assert fn.regions[RegionIndex.BAR0].mmap_fd == 99
    assert tuple(fn.regions[RegionIndex.BAR0].mmap_areas) == (area,)


@pytest.mark.parametrize(
    ("offset", "count", "pieces"),
    [
        (0x1000, 4, [(0x1000, 4)]),  # a doorbell
        (0x0, 8, [(0x0, 8)]),  # CAP as one qword
        (0x4, 8, [(0x4, 4), (0x8, 4)]),  # qword at a dword boundary
        (0x28, 16, [(0x28, 8), (0x30, 8)]),
        (0x1, 7, [(0x1, 1), (0x2, 2), (0x4, 4)]),
        (0x2, 2, [(0x2, 2)]),
        (0x3, 1, [(0x3, 1)]),
        (0x6, 6, [(0x6, 2), (0x8, 4)]),
    ],
)
def test_bar0_splits_into_natural_pieces(
    offset: int, count: int, pieces: list[tuple[int, int]]
) -> None:
    fn, bar0 = make_function()
    data = bytes(range(0x80, 0x80 + count))
    fn.region_write(RegionIndex.BAR0, offset, data)
    assert [(o, s) for o, s, _ in bar0.writes] == pieces
    for o, s, value in bar0.writes:
        assert value == int.from_bytes(data[o - offset : o - offset + s], "little")
    got = fn.region_read(RegionIndex.BAR0, offset, count)
    assert bar0.reads == pieces
    assert got == bytes((offset + i) & 0xFF for i in range(count))


def test_bar0_read_masks_oversized_handler_values() -> None:
    class Wide(FakeBar0):
        def mmio_read(self, offset: int, size: int) -> int:
            return 0x1_2345_6789_ABCD_EF01_2345

    fn = NvmePciFunction(Wide(), BAR0_SIZE, 1)
    assert fn.region_read(RegionIndex.BAR0, 0, 4) == (0xEF01_2345).to_bytes(4, "little")
    assert fn.region_read(RegionIndex.BAR0, 0, 2) == (0x2345).to_bytes(2, "little")


@pytest.mark.parametrize(
    ("index", "offset", "count"),
    [
        (RegionIndex.BAR0, BAR0_SIZE - 2, 4),
        (RegionIndex.BAR0, -4, 4),
        (RegionIndex.BAR0, BAR0_SIZE, 1),
        (RegionIndex.CONFIG, 4095, 2),
        (RegionIndex.BAR4, 0x2000, 4),
        (RegionIndex.BAR2, 0, 4),
        (RegionIndex.ROM, 0, 4),
        (RegionIndex.VGA, 0, 0),
        (9, 0, 4),
        (-1, 0, 4),
    ],
)
def test_out_of_range_is_einval(index: int, offset: int, count: int) -> None:
    fn, bar0 = make_function()
    with pytest.raises(DeviceError) as info:
        fn.region_read(index, offset, count)
    assert info.value.errno == errno.EINVAL
    with pytest.raises(DeviceError) as info:
        fn.region_write(index, offset, bytes(max(count, 0)))
    assert info.value.errno == errno.EINVAL
    assert not bar0.reads and not bar0.writes


def test_bar0_without_controller_is_eio() -> None:
    fn = NvmePciFunction(None, BAR0_SIZE, 2)
    with pytest.raises(DeviceError) as info:
        fn.region_read(RegionIndex.BAR0, 0, 4)
    assert info.value.errno == errno.EIO
    fn.reset()  # no controller to reset: fine
    bar0 = FakeBar0()
    fn.attach_bar0(bar0)
    fn.region_write(RegionIndex.BAR0, 0x14, b"\x01\x00\x00\x00")
    assert bar0.writes == [(0x14, 4, 1)]


def test_flr_via_device_control() -> None:
    fn, bar0 = make_function()
    cfg_write(fn, HeaderReg.COMMAND, 2, Command.MEMORY_SPACE | Command.BUS_MASTER)
    cfg_write(fn, HeaderReg.INTERRUPT_LINE, 1, 11)
    cfg_write(fn, MSIX_CONTROL, 2, caps.MSIX_ENABLE)
    keep = eventfd()
    set_eventfds(fn, IrqIndex.MSIX, 0, [os.dup(keep)])
    assert fn.msix_enabled()

    cfg_write(fn, DEVCTL, 2, caps.DEVCTL_DEFAULT | caps.DeviceControl.INITIATE_FLR)

    assert bar0.resets == 1
    assert cfg_read(fn, HeaderReg.COMMAND, 2) == 0
    assert cfg_read(fn, HeaderReg.INTERRUPT_LINE, 1) == 0
    assert cfg_read(fn, DEVCTL, 2) == caps.DEVCTL_DEFAULT  # Initiate FLR reads 0
    assert cfg_read(fn, MSIX_CONTROL, 2) == VECTORS - 1
    # the client's eventfds survive a guest FLR (QEMU would not send them again)
    assert fn.msix_enabled()
    fn.signal(0)
    assert fired(keep) == 1
    fn.close()
    os.close(keep)


def test_devctl_write_without_flr_bit_does_not_reset() -> None:
    fn, bar0 = make_function()
    cfg_write(fn, DEVCTL, 2, 0x00FF)
    cfg_write(fn, DEVCTL, 1, 0xFF)  # low byte only: cannot carry the FLR bit
    assert bar0.resets == 0
    cfg_write(fn, DEVCTL + 1, 1, 0x80)  # high byte alone can
    assert bar0.resets == 1


def test_device_reset_closes_everything() -> None:
    fn, bar0 = make_function()
    msix_fd, intx_fd = eventfd(), eventfd()
    set_eventfds(fn, IrqIndex.MSIX, 0, [msix_fd])
    set_eventfds(fn, IrqIndex.INTX, 0, [intx_fd])
    cfg_write(fn, HeaderReg.COMMAND, 2, Command.BUS_MASTER)
    fn.reset()
    assert bar0.resets == 1
    assert not is_open(msix_fd) and not is_open(intx_fd)
    assert not fn.msix_enabled()
    assert cfg_read(fn, HeaderReg.COMMAND, 2) == 0


def test_quiesced_default_and_custom() -> None:
    fn, _ = make_function()
    with fn.quiesced():
        pass
    calls: list[str] = []

    @contextlib.contextmanager
    def pause() -> Iterator[None]:
        calls.append("in")
        yield
        calls.append("out")

    fn = NvmePciFunction(FakeBar0(), BAR0_SIZE, 1, quiesce=pause)
    with fn.quiesced():
        assert calls == ["in"]
    assert calls == ["in", "out"]


@pytest.mark.parametrize(
    "request_",
    [
        IrqSet(IrqIndex.MSI, IrqAction.TRIGGER, 0, 1),
        IrqSet(IrqIndex.ERR, IrqAction.MASK, 0, 1),
        IrqSet(7, IrqAction.TRIGGER, 0, 0),
        IrqSet(IrqIndex.MSIX, IrqAction.TRIGGER, VECTORS - 1, 2),
        IrqSet(IrqIndex.MSIX, IrqAction.TRIGGER, 0, 1, flags=[True, False]),
        IrqSet(IrqIndex.MSIX, IrqAction.TRIGGER, -1, 1),
        IrqSet(IrqIndex.INTX, IrqAction.TRIGGER, 1, 1),
        IrqSet(IrqIndex.INTX, IrqAction.UNMASK, 0, 2),
    ],
)
def test_bad_irq_requests_are_einval(request_: IrqSet) -> None:
    fn, _ = make_function()
    with pytest.raises(DeviceError) as info:
        fn.set_irqs(request_)
    assert info.value.errno == errno.EINVAL


def test_refused_requests_close_their_fds() -> None:
    fn, _ = make_function()
    for request_ in [
        IrqSet(IrqIndex.MSI, IrqAction.TRIGGER, 0, 1, fds=[eventfd()]),
        IrqSet(IrqIndex.MSIX, IrqAction.TRIGGER, VECTORS, 1, fds=[eventfd()]),
        IrqSet(IrqIndex.MSIX, IrqAction.UNMASK, 0, 1, fds=[eventfd()]),
        IrqSet(IrqIndex.INTX, IrqAction.UNMASK, 0, 1, fds=[eventfd()]),  # KVM resamplefd
    ]:
        assert request_.fds is not None
        fd = request_.fds[0]
        with pytest.raises(DeviceError):
            fn.set_irqs(request_)
        assert not is_open(fd)


def test_disabling_unoffered_indexes_is_accepted() -> None:
    fn, _ = make_function()
    for index in (IrqIndex.MSI, IrqIndex.ERR, IrqIndex.REQ):
        fn.set_irqs(IrqSet(index, IrqAction.TRIGGER, 0, 0))


def test_irq_info_flags() -> None:
    fn, _ = make_function()
    intx, _, msix, _, _ = fn.irq_info_flags
    assert intx == 0b111  # eventfd, maskable, automasked
    assert msix & 1 and not msix & 0b1000  # eventfd, not NORESIZE
