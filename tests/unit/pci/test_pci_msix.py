"""MSI-X delivery through real eventfds, masking, pending bits and SET_IRQS."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator

import pytest
from pci_helpers import (
    VECTORS,
    cfg_read,
    cfg_write,
    eventfds,
    fired,
    irq,
    is_open,
    make_function,
    set_eventfds,
)

from nvme_mdev.pci import NvmePciFunction
from nvme_mdev.pci import capabilities as caps
from nvme_mdev.pci.msix import ENTRY_SIZE, ENTRY_VECTOR_CONTROL
from nvme_mdev.vfio_user.device import IrqAction, IrqIndex, IrqSet, RegionIndex

MSIX_CONTROL = caps.MSIX_OFFSET + caps.MSIX_MESSAGE_CONTROL


@pytest.fixture
def wired() -> Iterator[tuple[NvmePciFunction, list[int]]]:
    """A function with every MSI-X vector wired to an eventfd the test can read."""
    fn, _ = make_function()
    with eventfds(VECTORS) as fds:
        set_eventfds(fn, IrqIndex.MSIX, 0, [os.dup(fd) for fd in fds])
        yield fn, fds
        fn.close()


def pba(fn: NvmePciFunction) -> int:
    lay = fn.msix.layout
    return int.from_bytes(fn.region_read(RegionIndex.BAR4, lay.pba_offset, lay.pba_size), "little")


def write_vector_control(fn: NvmePciFunction, vector: int, value: int) -> None:
    offset = vector * ENTRY_SIZE + ENTRY_VECTOR_CONTROL
    fn.region_write(RegionIndex.BAR4, offset, value.to_bytes(4, "little"))


def test_signal_writes_the_vectors_eventfd(wired: tuple[NvmePciFunction, list[int]]) -> None:
    fn, fds = wired
    assert fn.msix_enabled()  # eventfds set: enabled even without the capability bit
    fn.signal(3)
    fn.signal(3)
    assert fired(fds[3]) == 2
    assert [fired(fd) for i, fd in enumerate(fds) if i != 3] == [0] * (VECTORS - 1)
    assert pba(fn) == 0


def test_function_mask_pends_and_unmask_fires(wired: tuple[NvmePciFunction, list[int]]) -> None:
    fn, fds = wired
    cfg_write(fn, MSIX_CONTROL, 2, caps.MSIX_ENABLE | caps.MSIX_FUNCTION_MASK)
    fn.signal(1)
    fn.signal(5)
    assert fired(fds[1]) == fired(fds[5]) == 0
    assert pba(fn) == (1 << 1) | (1 << 5)
    cfg_write(fn, MSIX_CONTROL, 2, caps.MSIX_ENABLE)
    assert fired(fds[1]) == fired(fds[5]) == 1
    assert pba(fn) == 0


def test_table_mask_from_a_direct_client(wired: tuple[NvmePciFunction, list[int]]) -> None:
    fn, fds = wired
    # Until the client writes the table it is QEMU's: power-on mask bits do not count.
    assert fn.msix.entry(2)[2] == 1
    fn.signal(2)
    assert fired(fds[2]) == 1
    # A direct client programs the table: vector 2 unmasked, the rest still masked.
    fn.region_write(RegionIndex.BAR4, 2 * ENTRY_SIZE, (0xFEE0_0000).to_bytes(8, "little"))
    write_vector_control(fn, 2, 0)
    fn.signal(2)
    fn.signal(4)
    assert fired(fds[2]) == 1
    assert fired(fds[4]) == 0 and pba(fn) == 1 << 4
    write_vector_control(fn, 4, 0)
    assert fired(fds[4]) == 1 and pba(fn) == 0
    write_vector_control(fn, 2, 1)
    fn.signal(2)
    assert fired(fds[2]) == 0 and fn.msix.pending(2)


def test_table_reads_back_and_masks_reserved_bits(wired: tuple[NvmePciFunction, list[int]]) -> None:
    fn, _ = wired
    entry = (0xFEE0_1003).to_bytes(4, "little") + b"\x00\x00\x00\x00"
    entry += (0x4021).to_bytes(4, "little") + (0xFFFF_FFFF).to_bytes(4, "little")
    fn.region_write(RegionIndex.BAR4, ENTRY_SIZE, entry)
    address, data, control = fn.msix.entry(1)
    assert address == 0xFEE0_1000  # bits 1:0 read-only zero
    assert data == 0x4021
    assert control == 1  # only the mask bit is writable
    raw = fn.region_read(RegionIndex.BAR4, ENTRY_SIZE, ENTRY_SIZE)
    assert raw[:4] == (0xFEE0_1000).to_bytes(4, "little")


def test_pba_is_read_only_and_holes_read_zero(wired: tuple[NvmePciFunction, list[int]]) -> None:
    fn, _ = wired
    cfg_write(fn, MSIX_CONTROL, 2, caps.MSIX_FUNCTION_MASK)
    fn.signal(0)
    lay = fn.msix.layout
    fn.region_write(RegionIndex.BAR4, lay.pba_offset, bytes(8))
    assert pba(fn) == 1
    hole = lay.table_size
    fn.region_write(RegionIndex.BAR4, hole, b"\xff" * 16)
    assert fn.region_read(RegionIndex.BAR4, hole, 16) == bytes(16)
    # a read spanning table end and hole
    assert len(fn.region_read(RegionIndex.BAR4, lay.table_size - 4, 8)) == 8


def test_set_irqs_mask_and_unmask(wired: tuple[NvmePciFunction, list[int]]) -> None:
    fn, fds = wired
    fn.set_irqs(irq(IrqIndex.MSIX, IrqAction.MASK, start=2, count=2))
    fn.signal(2)
    fn.signal(3)
    fn.signal(4)
    assert fired(fds[2]) == fired(fds[3]) == 0 and fired(fds[4]) == 1
    assert pba(fn) == 0b1100
    fn.set_irqs(irq(IrqIndex.MSIX, IrqAction.UNMASK, start=2, count=2, flags=[False, True]))
    assert fired(fds[3]) == 1 and fired(fds[2]) == 0 and pba(fn) == 0b0100
    fn.set_irqs(irq(IrqIndex.MSIX, IrqAction.UNMASK, start=2, count=1))
    assert fired(fds[2]) == 1 and pba(fn) == 0


def test_software_trigger(wired: tuple[NvmePciFunction, list[int]]) -> None:
    fn, fds = wired
    fn.set_irqs(irq(IrqIndex.MSIX, IrqAction.TRIGGER, start=0, count=2))
    assert fired(fds[0]) == fired(fds[1]) == 1
    fn.set_irqs(irq(IrqIndex.MSIX, IrqAction.TRIGGER, start=4, count=3, flags=[True, False, True]))
    assert [fired(fds[i]) for i in (4, 5, 6)] == [1, 0, 1]


def test_disable_closes_fds_and_keeps_pending() -> None:
    fn, _ = make_function()
    with eventfds(2) as mine:
        given = [os.dup(fd) for fd in mine]
        set_eventfds(fn, IrqIndex.MSIX, 0, given)
        fn.set_irqs(IrqSet(IrqIndex.MSIX, IrqAction.TRIGGER, 0, 0))  # DATA_NONE, count 0
        assert not any(is_open(fd) for fd in given)
        assert not fn.msix_enabled()
        fn.signal(1)  # nowhere to go: pending
        assert pba(fn) == 0b10
        # QEMU without dynamic allocation re-enables the whole index: pending fires
        set_eventfds(fn, IrqIndex.MSIX, 0, [os.dup(fd) for fd in mine])
        assert fired(mine[1]) == 1 and pba(fn) == 0
        fn.close()


def test_minus_one_detaches_and_closes_one_vector() -> None:
    fn, _ = make_function()
    with eventfds(2) as mine:
        given = [os.dup(fd) for fd in mine]
        set_eventfds(fn, IrqIndex.MSIX, 0, given)
        set_eventfds(fn, IrqIndex.MSIX, 1, [-1])
        assert not is_open(given[1]) and is_open(given[0])
        fn.signal(1)
        assert fired(mine[1]) == 0 and fn.msix.pending(1)
        fn.close()
        assert not is_open(given[0])


def test_qemu_style_enable_then_attach_vector() -> None:
    """QEMU (dynamic allocation) enables MSI-X with vector 0 = -1 and no fds, then
    attaches each vector's eventfd when the guest unmasks it in QEMU's table."""
    fn, _ = make_function()
    cfg_write(fn, MSIX_CONTROL, 2, caps.MSIX_ENABLE)  # written through first
    fn.set_irqs(IrqSet(IrqIndex.MSIX, IrqAction.TRIGGER, 0, 1, fds=[]))
    assert fn.msix_enabled() and fn.msix.client_enabled
    fn.signal(3)  # guest has not unmasked vector 3 yet
    assert fn.msix.pending(3)
    with eventfds(1) as (mine,):
        set_eventfds(fn, IrqIndex.MSIX, 3, [os.dup(mine)])
        assert fired(mine) == 1 and not fn.msix.pending(3)
        fn.close()


def test_enabled_rule_capability_bit_alone() -> None:
    fn, _ = make_function()
    assert not fn.msix_enabled()
    cfg_write(fn, MSIX_CONTROL, 2, caps.MSIX_ENABLE)
    assert fn.msix_enabled()
    cfg_write(fn, MSIX_CONTROL, 2, 0)
    assert not fn.msix_enabled()
    assert cfg_read(fn, MSIX_CONTROL, 2) == VECTORS - 1


def test_bad_vector() -> None:
    fn, _ = make_function()
    with pytest.raises(IndexError):
        fn.signal(VECTORS)
    with pytest.raises(IndexError):
        fn.signal(-1)


def test_fds_count_mismatch_is_refused() -> None:
    fn, _ = make_function()
    with eventfds(2) as mine:
        given = [os.dup(fd) for fd in mine]
        with pytest.raises(Exception, match="2 eventfds for 3"):
            fn.set_irqs(IrqSet(IrqIndex.MSIX, IrqAction.TRIGGER, 0, 3, fds=given))
        assert not any(is_open(fd) for fd in given)


def test_signal_races_with_set_irqs() -> None:
    """Vectors fire from several threads while the client swaps and closes their
    eventfds: nothing raises and no signal lands on an fd the device no longer owns."""
    fn, _ = make_function()
    stop = threading.Event()
    errors: list[BaseException] = []

    def fire() -> None:
        try:
            while not stop.is_set():
                for vector in range(VECTORS):
                    fn.signal(vector)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    # An fd the device never owned, opened after every close: if the device wrote
    # through a stale number the kernel reused, this one would count it.
    with eventfds(1) as (bystander,):
        threads = [threading.Thread(target=fire) for _ in range(3)]
        for t in threads:
            t.start()
        try:
            for _ in range(300):
                with eventfds(VECTORS) as mine:
                    set_eventfds(fn, IrqIndex.MSIX, 0, [os.dup(fd) for fd in mine])
                    fn.set_irqs(IrqSet(IrqIndex.MSIX, IrqAction.TRIGGER, 0, 0))
                assert fired(bystander) == 0
        finally:
            stop.set()
            for t in threads:
                t.join()
    assert errors == []
    fn.close()
