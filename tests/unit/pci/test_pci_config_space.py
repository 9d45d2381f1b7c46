"""Config space defaults, write masks, BAR sizing and the capability chain."""

from __future__ import annotations

import pytest
from pci_helpers import BAR0_SIZE, VECTORS, cfg_read, cfg_write, make_function

from nvme_mdev.pci import capabilities as caps
from nvme_mdev.pci.config_space import (
    CLASS_CODE,
    DEVICE_ID,
    SUBSYSTEM_ID,
    SUBSYSTEM_VENDOR_ID,
    VENDOR_ID,
    Command,
    ConfigSpace,
    HeaderReg,
    Status,
    bar_offset,
    define_memory_bar,
    define_type0_header,
)
from nvme_mdev.vfio_user.device import RegionIndex

PM = caps.POWER_MANAGEMENT_OFFSET
MSIX = caps.MSIX_OFFSET
PCIE = caps.PCI_EXPRESS_OFFSET


def test_identity_and_class() -> None:
    fn, _ = make_function()
    assert cfg_read(fn, HeaderReg.VENDOR_ID, 2) == VENDOR_ID == 0x4E4D
    assert cfg_read(fn, HeaderReg.DEVICE_ID, 2) == DEVICE_ID == 0x0001
    assert cfg_read(fn, HeaderReg.SUBSYSTEM_VENDOR_ID, 2) == SUBSYSTEM_VENDOR_ID == 0x4E4D
    assert cfg_read(fn, HeaderReg.SUBSYSTEM_ID, 2) == SUBSYSTEM_ID == 0x0001
    assert cfg_read(fn, HeaderReg.REVISION_ID, 1) == 0x01
    assert cfg_read(fn, HeaderReg.CLASS_CODE, 3) == CLASS_CODE == 0x010802
    assert cfg_read(fn, HeaderReg.HEADER_TYPE, 1) == 0
    assert cfg_read(fn, HeaderReg.INTERRUPT_PIN, 1) == 1
    assert cfg_read(fn, HeaderReg.STATUS, 2) == Status.CAPABILITIES_LIST
    assert cfg_read(fn, HeaderReg.COMMAND, 2) == 0


def test_capability_chain() -> None:
    fn, _ = make_function()
    chain = caps.capability_list(fn.config)
    assert chain == [
        (caps.CapabilityId.POWER_MANAGEMENT, 0x40),
        (caps.CapabilityId.MSIX, 0x50),
        (caps.CapabilityId.PCI_EXPRESS, 0x60),
    ]
    # every capability fits before the next one
    assert PM + caps.PM_LENGTH <= MSIX
    assert MSIX + caps.MSIX_LENGTH <= PCIE
    assert PCIE + caps.PCIE_LENGTH <= 0x100
    assert cfg_read(fn, 0x100, 4) == 0  # empty extended capability list


def test_power_management_capability() -> None:
    fn, _ = make_function()
    assert cfg_read(fn, PM + caps.PM_CAPABILITIES, 2) & 0x7 == 3
    pmcsr = PM + caps.PM_CONTROL_STATUS
    assert cfg_read(fn, pmcsr, 2) == caps.PMCSR_NO_SOFT_RESET
    cfg_write(fn, pmcsr, 2, 3)  # D3hot
    assert fn.power_state() == caps.PowerState.D3HOT
    assert cfg_read(fn, pmcsr, 2) & caps.PMCSR_NO_SOFT_RESET
    cfg_write(fn, pmcsr, 2, 1)  # D1: unsupported, ignored
    assert fn.power_state() == caps.PowerState.D3HOT
    cfg_write(fn, pmcsr, 2, 0)
    assert fn.power_state() == caps.PowerState.D0
    cfg_write(fn, pmcsr, 2, 0xFFFF)  # D3hot, RO bits stay
    assert cfg_read(fn, pmcsr, 2) == 3 | caps.PMCSR_NO_SOFT_RESET


def test_msix_capability() -> None:
    fn, _ = make_function()
    lay = fn.msix.layout
    assert cfg_read(fn, MSIX + caps.MSIX_MESSAGE_CONTROL, 2) == VECTORS - 1
    assert cfg_read(fn, MSIX + caps.MSIX_TABLE, 4) == 0 | 4
    assert cfg_read(fn, MSIX + caps.MSIX_PBA, 4) == lay.pba_offset | 4
    assert lay.pba_offset == 0x1000 and lay.bar_size == 0x2000
    # enable and function mask are the only writable bits
    cfg_write(fn, MSIX + caps.MSIX_MESSAGE_CONTROL, 2, 0xFFFF)
    assert cfg_read(fn, MSIX + caps.MSIX_MESSAGE_CONTROL, 2) == 0xC000 | (VECTORS - 1)
    cfg_write(fn, MSIX + caps.MSIX_TABLE, 4, 0xFFFFFFFF)
    assert cfg_read(fn, MSIX + caps.MSIX_TABLE, 4) == 4


@pytest.mark.parametrize("vectors", [1, 64, 256, 257, 2048])
def test_msix_layout_never_overlaps(vectors: int) -> None:
    fn, _ = make_function(vectors)
    lay = fn.msix.layout
    assert lay.table_offset + lay.table_size <= lay.pba_offset
    assert lay.pba_offset % 4096 == 0
    assert lay.pba_offset + lay.pba_size <= lay.bar_size
    assert lay.bar_size & (lay.bar_size - 1) == 0
    assert fn.regions[RegionIndex.BAR4].size == lay.bar_size


def test_pci_express_capability() -> None:
    fn, _ = make_function()
    flags = cfg_read(fn, PCIE + caps.PCIE_CAPABILITIES, 2)
    assert flags & 0xF == 2  # version 2
    assert (flags >> 4) & 0xF == caps.PCIE_TYPE_ENDPOINT
    devcap = cfg_read(fn, PCIE + caps.PCIE_DEVICE_CAPABILITIES, 4)
    assert devcap & caps.DeviceCapabilities.FUNCTION_LEVEL_RESET
    devctl = PCIE + caps.PCIE_DEVICE_CONTROL
    assert cfg_read(fn, devctl, 2) == caps.DEVCTL_DEFAULT
    link = cfg_read(fn, PCIE + caps.PCIE_LINK_STATUS, 2)
    assert link & 0xF == 1 and (link >> 4) & 0x3F == 1


def test_read_only_fields_survive_all_ones() -> None:
    fn, _ = make_function()
    before = fn.region_read(RegionIndex.CONFIG, 0, 0x40)
    cfg_write(fn, 0x00, 4, 0xFFFFFFFF)  # IDs
    cfg_write(fn, 0x08, 4, 0xFFFFFFFF)  # revision, class
    cfg_write(fn, 0x2C, 4, 0xFFFFFFFF)  # subsystem IDs
    cfg_write(fn, 0x34, 1, 0xFF)  # capabilities pointer
    cfg_write(fn, 0x3D, 1, 0xFF)  # interrupt pin
    cfg_write(fn, 0x0E, 1, 0xFF)  # header type
    after = fn.region_read(RegionIndex.CONFIG, 0, 0x40)
    for offset, size in [(0, 4), (8, 4), (0x2C, 4), (0x34, 1), (0x3D, 1), (0x0E, 1)]:
        assert after[offset : offset + size] == before[offset : offset + size]


def test_command_register_mask() -> None:
    fn, _ = make_function()
    cfg_write(fn, HeaderReg.COMMAND, 2, 0xFFFF)
    command = cfg_read(fn, HeaderReg.COMMAND, 2)
    assert command & Command.MEMORY_SPACE
    assert command & Command.BUS_MASTER
    assert command & Command.INTX_DISABLE
    assert not command & Command.IO_SPACE  # no I/O BARs
    assert not command & Command.SPECIAL_CYCLES
    assert fn.bus_master_enabled()
    cfg_write(fn, HeaderReg.COMMAND, 2, 0)
    assert cfg_read(fn, HeaderReg.COMMAND, 2) == 0


def test_status_register_write1_clear() -> None:
    fn, _ = make_function()
    errors = Status.RECEIVED_MASTER_ABORT | Status.DETECTED_PARITY_ERROR
    fn.config.store(HeaderReg.STATUS, 2, Status.CAPABILITIES_LIST | errors)
    cfg_write(fn, HeaderReg.STATUS, 2, 0)  # writing 0 keeps RW1C bits
    assert cfg_read(fn, HeaderReg.STATUS, 2) == Status.CAPABILITIES_LIST | errors
    cfg_write(fn, HeaderReg.STATUS, 2, Status.RECEIVED_MASTER_ABORT | Status.CAPABILITIES_LIST)
    assert cfg_read(fn, HeaderReg.STATUS, 2) == (
        Status.CAPABILITIES_LIST | Status.DETECTED_PARITY_ERROR
    )
    cfg_write(fn, HeaderReg.STATUS, 2, 0xFFFF)  # capabilities bit is read-only
    assert cfg_read(fn, HeaderReg.STATUS, 2) == Status.CAPABILITIES_LIST


def test_device_status_write1_clear() -> None:
    fn, _ = make_function()
    devsta = PCIE + caps.PCIE_DEVICE_STATUS
    fn.config.store(devsta, 2, 0b0101)
    cfg_write(fn, devsta, 2, 0b0001)
    assert cfg_read(fn, devsta, 2) == 0b0100


def test_bar0_sizing_64bit() -> None:
    fn, _ = make_function()
    assert cfg_read(fn, bar_offset(0), 4) == 0b0100  # memory, 64-bit, non-prefetchable
    cfg_write(fn, bar_offset(0), 4, 0xFFFFFFFF)
    cfg_write(fn, bar_offset(1), 4, 0xFFFFFFFF)
    low, high = cfg_read(fn, bar_offset(0), 4), cfg_read(fn, bar_offset(1), 4)
    mask = (high << 32) | (low & ~0xF)
    assert (~mask + 1) & 0xFFFFFFFFFFFFFFFF == BAR0_SIZE
    assert low & 0xF == 0b0100
    cfg_write(fn, bar_offset(0), 8, 0x12_3456_8000)  # an address, both halves at once
    assert cfg_read(fn, bar_offset(0), 8) == 0x12_3456_8000 | 0b0100


def test_bar4_sizing_32bit_and_unimplemented_bars() -> None:
    fn, _ = make_function()
    assert cfg_read(fn, bar_offset(4), 4) == 0  # memory, 32-bit
    cfg_write(fn, bar_offset(4), 4, 0xFFFFFFFF)
    size = (~(cfg_read(fn, bar_offset(4), 4) & ~0xF) + 1) & 0xFFFFFFFF
    assert size == fn.msix.layout.bar_size
    for index in (2, 3, 5):
        cfg_write(fn, bar_offset(index), 4, 0xFFFFFFFF)
        assert cfg_read(fn, bar_offset(index), 4) == 0
    cfg_write(fn, HeaderReg.EXPANSION_ROM, 4, 0xFFFFFFFF)
    assert cfg_read(fn, HeaderReg.EXPANSION_ROM, 4) == 0


def test_interrupt_line_is_writable() -> None:
    fn, _ = make_function()
    cfg_write(fn, HeaderReg.INTERRUPT_LINE, 2, 0xFF0B)  # line and (read-only) pin
    assert cfg_read(fn, HeaderReg.INTERRUPT_LINE, 1) == 0x0B
    assert cfg_read(fn, HeaderReg.INTERRUPT_PIN, 1) == 1


def test_unaligned_and_odd_sized_accesses() -> None:
    fn, _ = make_function()
    whole = fn.region_read(RegionIndex.CONFIG, 0, 4096)
    assert len(whole) == 4096
    assert fn.region_read(RegionIndex.CONFIG, 1, 3) == whole[1:4]
    assert fn.region_read(RegionIndex.CONFIG, 4093, 3) == whole[4093:]
    fn.region_write(RegionIndex.CONFIG, 0x3B, b"\xff\x42\xff")  # straddles line/pin
    assert cfg_read(fn, HeaderReg.INTERRUPT_LINE, 2) == 0x0142


def test_header_validation() -> None:
    cs = ConfigSpace()
    with pytest.raises(ValueError):
        define_type0_header(cs, bar0_size=0x2000, msix_bar_size=0x2000)  # < 16 KiB
    with pytest.raises(ValueError):
        define_type0_header(cs, bar0_size=0x6000, msix_bar_size=0x2000)  # not a power of 2
    with pytest.raises(ValueError):
        define_memory_bar(cs, 1, 0x4000, is_64bit=True)  # odd index
    with pytest.raises(ValueError):
        cs.define(0, 2, 0, writable=1, write1_clear=1)
