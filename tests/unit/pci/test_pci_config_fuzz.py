"""Random host writes to config space never change read-only fields or crash."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from pci_helpers import BAR0_SIZE, VECTORS, make_function

from nvme_mdev.pci import capabilities as caps
from nvme_mdev.pci.config_space import CONFIG_SPACE_SIZE, bar_offset
from nvme_mdev.vfio_user.device import RegionIndex

# (offset, size) of fields a host must never be able to change
READ_ONLY = [
    (0x00, 4),  # vendor, device
    (0x08, 4),  # revision, class
    (0x0E, 1),  # header type
    (0x2C, 4),  # subsystem IDs
    (0x30, 4),  # no ROM
    (0x34, 1),  # capabilities pointer
    (0x3D, 1),  # interrupt pin
    (caps.POWER_MANAGEMENT_OFFSET, 4),  # ID, next, PMC
    (caps.MSIX_OFFSET, 2),  # ID, next
    (caps.MSIX_OFFSET + caps.MSIX_TABLE, 8),  # table and PBA offset/BIR
    (caps.PCI_EXPRESS_OFFSET, 8),  # ID, next, flags, device capabilities
    (caps.PCI_EXPRESS_OFFSET + caps.PCIE_LINK_CAPABILITIES, 4),
    (0x100, 4),  # extended capability header
]

writes = st.lists(
    st.integers(0, CONFIG_SPACE_SIZE - 1).flatmap(
        lambda offset: st.tuples(
            st.just(offset), st.binary(min_size=1, max_size=min(64, CONFIG_SPACE_SIZE - offset))
        )
    ),
    max_size=20,
)


@settings(max_examples=300, deadline=None)
@given(writes)
def test_random_writes_keep_read_only_fields(ops: list[tuple[int, bytes]]) -> None:
    fn, bar0 = make_function()
    before = fn.region_read(RegionIndex.CONFIG, 0, CONFIG_SPACE_SIZE)
    for offset, data in ops:
        fn.region_write(RegionIndex.CONFIG, offset, data)
        after = fn.region_read(RegionIndex.CONFIG, 0, CONFIG_SPACE_SIZE)
        assert len(after) == CONFIG_SPACE_SIZE
        for field, size in READ_ONLY:
            assert after[field : field + size] == before[field : field + size], hex(field)
        # BAR type bits and size alignment hold whatever was written
        bar0_value = int.from_bytes(after[bar_offset(0) : bar_offset(0) + 8], "little")
        assert bar0_value & 0xF == 0b0100
        assert bar0_value & (BAR0_SIZE - 1) & ~0xF == 0
        table_size = int.from_bytes(after[caps.MSIX_OFFSET + 2 : caps.MSIX_OFFSET + 4], "little")
        assert table_size & caps.MSIX_TABLE_SIZE_MASK == VECTORS - 1
        assert fn.power_state() in caps.SUPPORTED_POWER_STATES
        # the Initiate FLR bit always reads 0
        devctl = caps.PCI_EXPRESS_OFFSET + caps.PCIE_DEVICE_CONTROL
        assert not after[devctl + 1] & 0x80
        pmcsr = caps.POWER_MANAGEMENT_OFFSET + caps.PM_CONTROL_STATUS
        assert after[pmcsr] & caps.PMCSR_NO_SOFT_RESET
    # an FLR, if one was written, left the function at its defaults
    if bar0.resets:
        assert fn.region_read(RegionIndex.CONFIG, 0, 4) == before[:4]
