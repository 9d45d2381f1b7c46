"""INTx: level-triggered emulation over an automasked eventfd, as QEMU drives it."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from pci_helpers import cfg_read, cfg_write, eventfds, fired, irq, is_open, make_function

from nvme_mdev.pci import NvmePciFunction
from nvme_mdev.pci import capabilities as caps
from nvme_mdev.pci.config_space import Command, HeaderReg, Status
from nvme_mdev.vfio_user.device import IrqAction, IrqIndex, IrqSet


@pytest.fixture
def wired() -> Iterator[tuple[NvmePciFunction, int]]:
    fn, _ = make_function()
    with eventfds(1) as (mine,):
        fn.set_irqs(IrqSet(IrqIndex.INTX, IrqAction.TRIGGER, 0, 1, fds=[os.dup(mine)]))
        yield fn, mine
        fn.close()


def unmask(fn: NvmePciFunction) -> None:
    fn.set_irqs(irq(IrqIndex.INTX, IrqAction.UNMASK))


def test_assert_fires_once_then_automasks(wired: tuple[NvmePciFunction, int]) -> None:
    fn, fd = wired
    fn.set_intx(True)
    assert fired(fd) == 1
    assert fn.intx.masked
    fn.set_intx(True)  # still asserted, still masked: nothing new
    fn.set_intx(False)
    fn.set_intx(True)  # a new edge while masked waits for the unmask
    assert fired(fd) == 0


def test_unmask_refires_while_asserted(wired: tuple[NvmePciFunction, int]) -> None:
    """QEMU's EOI: after a BAR access it deasserts and sends UNMASK; a level still
    high must come back as a new interrupt."""
    fn, fd = wired
    fn.set_intx(True)
    assert fired(fd) == 1
    unmask(fn)
    assert fired(fd) == 1  # still asserted
    fn.set_intx(False)
    unmask(fn)
    assert fired(fd) == 0  # level low: the EOI just re-arms
    fn.set_intx(True)
    assert fired(fd) == 1


def test_mask_holds_the_line(wired: tuple[NvmePciFunction, int]) -> None:
    fn, fd = wired
    fn.set_irqs(irq(IrqIndex.INTX, IrqAction.MASK))
    fn.set_intx(True)
    assert fired(fd) == 0
    fn.set_irqs(irq(IrqIndex.INTX, IrqAction.UNMASK, flags=[False]))  # selects nothing
    assert fired(fd) == 0
    fn.set_irqs(irq(IrqIndex.INTX, IrqAction.UNMASK, flags=[True]))
    assert fired(fd) == 1


def test_status_interrupt_bit_follows_level(wired: tuple[NvmePciFunction, int]) -> None:
    fn, _ = wired
    assert not cfg_read(fn, HeaderReg.STATUS, 2) & Status.INTERRUPT_STATUS
    fn.set_intx(True)
    assert cfg_read(fn, HeaderReg.STATUS, 2) & Status.INTERRUPT_STATUS
    assert fn.region_read(7, HeaderReg.STATUS, 1)[0] & Status.INTERRUPT_STATUS
    cfg_write(fn, HeaderReg.STATUS, 2, 0xFFFF)  # read-only to the host
    assert cfg_read(fn, HeaderReg.STATUS, 2) & Status.INTERRUPT_STATUS
    fn.set_intx(False)
    assert not cfg_read(fn, HeaderReg.STATUS, 2) & Status.INTERRUPT_STATUS


def test_command_interrupt_disable(wired: tuple[NvmePciFunction, int]) -> None:
    fn, fd = wired
    cfg_write(fn, HeaderReg.COMMAND, 2, Command.INTX_DISABLE)
    fn.set_intx(True)
    assert fired(fd) == 0
    assert cfg_read(fn, HeaderReg.STATUS, 2) & Status.INTERRUPT_STATUS  # status still shows it
    cfg_write(fn, HeaderReg.COMMAND, 2, 0)
    assert fired(fd) == 1


def test_msix_enable_silences_intx(wired: tuple[NvmePciFunction, int]) -> None:
    fn, fd = wired
    control = caps.MSIX_OFFSET + caps.MSIX_MESSAGE_CONTROL
    cfg_write(fn, control, 2, caps.MSIX_ENABLE)
    fn.set_intx(True)
    assert fired(fd) == 0
    cfg_write(fn, control, 2, 0)
    assert fired(fd) == 1


def test_attach_with_level_high_fires() -> None:
    fn, _ = make_function()
    fn.set_intx(True)
    with eventfds(1) as (mine,):
        fn.set_irqs(IrqSet(IrqIndex.INTX, IrqAction.TRIGGER, 0, 1, fds=[os.dup(mine)]))
        assert fired(mine) == 1
        fn.close()


def test_disable_closes_fd() -> None:
    fn, _ = make_function()
    with eventfds(1) as (mine,):
        given = os.dup(mine)
        fn.set_irqs(IrqSet(IrqIndex.INTX, IrqAction.TRIGGER, 0, 1, fds=[given]))
        fn.set_irqs(IrqSet(IrqIndex.INTX, IrqAction.TRIGGER, 0, 0))
        assert not is_open(given)
        fn.set_intx(True)
        assert fired(mine) == 0


def test_replacing_fd_closes_old_one() -> None:
    fn, _ = make_function()
    with eventfds(2) as (a, b):
        given_a, given_b = os.dup(a), os.dup(b)
        fn.set_irqs(IrqSet(IrqIndex.INTX, IrqAction.TRIGGER, 0, 1, fds=[given_a]))
        fn.set_irqs(IrqSet(IrqIndex.INTX, IrqAction.TRIGGER, 0, 1, fds=[given_b]))
        assert not is_open(given_a) and is_open(given_b)
        fn.set_intx(True)
        assert fired(b) == 1 and fired(a) == 0
        fn.close()


def test_software_trigger(wired: tuple[NvmePciFunction, int]) -> None:
    fn, fd = wired
    fn.set_irqs(irq(IrqIndex.INTX, IrqAction.TRIGGER))
    fn.set_irqs(irq(IrqIndex.INTX, IrqAction.TRIGGER, flags=[True]))
    fn.set_irqs(irq(IrqIndex.INTX, IrqAction.TRIGGER, flags=[False]))
    assert fired(fd) == 2


def test_flr_drops_level_and_keeps_fd(wired: tuple[NvmePciFunction, int]) -> None:
    fn, fd = wired
    fn.set_intx(True)
    assert fired(fd) == 1
    devctl = caps.PCI_EXPRESS_OFFSET + caps.PCIE_DEVICE_CONTROL
    cfg_write(fn, devctl, 2, caps.DeviceControl.INITIATE_FLR)
    assert not fn.intx.level
    unmask(fn)
    fn.set_intx(True)
    assert fired(fd) == 1
