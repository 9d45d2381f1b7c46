"""The capability list of our NVMe function (PCI Local Bus 3.0 §6.7).

Chain: Capabilities Pointer (0x34) -> Power Management at 0x40 -> MSI-X at 0x50
-> PCI Express at 0x60 (60 bytes, to 0x9B) -> end. MSI is not offered: NVMe
drivers use MSI-X, and INTx remains for those that use neither. Extended
configuration space starts at 0x100 with an all-zero header (empty list).

PCI Express device/port type is Endpoint. QEMU's vfio-pci (hw/vfio/pci.c,
vfio_setup_pcie_cap) accepts Endpoint, Legacy Endpoint and RCiEP, and adapts
an Endpoint to the slot: on q35's root bus it rewrites it as a Root Complex
Integrated Endpoint and zeroes the link registers; behind a root port it stays
an Endpoint; on pc (i440fx, no PCIe anywhere) it is exposed as is; on a
conventional bus inside a PCIe machine it is hidden. So Endpoint works on
both q35 and pc.
"""

from __future__ import annotations

from enum import IntEnum, IntFlag
from typing import Final

from .config_space import ConfigSpace, HeaderReg


class CapabilityId(IntEnum):
    POWER_MANAGEMENT = 0x01
    MSI = 0x05
    PCI_EXPRESS = 0x10
    MSIX = 0x11


POWER_MANAGEMENT_OFFSET: Final = 0x40
MSIX_OFFSET: Final = 0x50
PCI_EXPRESS_OFFSET: Final = 0x60

# --- Power Management (PCI Bus Power Management 1.2) --------------------------------------

PM_CAPABILITIES: Final = 0x02  # PMC, 16 bits
PM_CONTROL_STATUS: Final = 0x04  # PMCSR, 16 bits
PM_LENGTH: Final = 8

PMC_VERSION_1_2: Final = 3
PMCSR_POWER_STATE_MASK: Final = 0x3
PMCSR_NO_SOFT_RESET: Final = 1 << 3


class PowerState(IntEnum):
    D0 = 0
    D1 = 1
    D2 = 2
    D3HOT = 3


SUPPORTED_POWER_STATES: Final = frozenset({PowerState.D0, PowerState.D3HOT})
"""D1/D2 are optional and not offered (PMC bits 9-10 clear)."""

# --- MSI-X (PCI Local Bus 3.0 §6.8.2) ---------------------------------------------------

MSIX_MESSAGE_CONTROL: Final = 0x02
MSIX_TABLE: Final = 0x04  # offset | BIR
MSIX_PBA: Final = 0x08  # offset | BIR
MSIX_LENGTH: Final = 12

MSIX_TABLE_SIZE_MASK: Final = 0x7FF  # N-1
MSIX_FUNCTION_MASK: Final = 1 << 14
MSIX_ENABLE: Final = 1 << 15
MSIX_BIR_MASK: Final = 0x7
MSIX_MAX_VECTORS: Final = 2048

# --- PCI Express capability, version 2 (PCIe Base §7.5.3) -------------------------------

PCIE_CAPABILITIES: Final = 0x02
PCIE_DEVICE_CAPABILITIES: Final = 0x04
PCIE_DEVICE_CONTROL: Final = 0x08
PCIE_DEVICE_STATUS: Final = 0x0A
PCIE_LINK_CAPABILITIES: Final = 0x0C
PCIE_LINK_CONTROL: Final = 0x10
PCIE_LINK_STATUS: Final = 0x12
PCIE_DEVICE_CAPABILITIES_2: Final = 0x24
PCIE_DEVICE_CONTROL_2: Final = 0x28
PCIE_LINK_CAPABILITIES_2: Final = 0x2C
PCIE_LINK_CONTROL_2: Final = 0x30
PCIE_LENGTH: Final = 0x3C  # through Slot Status 2

PCIE_CAP_VERSION_2: Final = 2
PCIE_TYPE_ENDPOINT: Final = 0x0
PCIE_TYPE_SHIFT: Final = 4


class DeviceCapabilities(IntFlag):
    ROLE_BASED_ERROR_REPORTING = 1 << 15  # required of PCIe 1.1+ functions
    FUNCTION_LEVEL_RESET = 1 << 28


# Endpoint L0s/L1 acceptable latency fields (bits 8:6, 11:9) = 111b: no limit.
DEVCAP_ACCEPTABLE_LATENCY_NO_LIMIT: Final = (0x7 << 6) | (0x7 << 9)


class DeviceControl(IntFlag):
    CORRECTABLE_ERROR_REPORTING = 1 << 0
    NON_FATAL_ERROR_REPORTING = 1 << 1
    FATAL_ERROR_REPORTING = 1 << 2
    UNSUPPORTED_REQUEST_REPORTING = 1 << 3
    RELAXED_ORDERING = 1 << 4
    MAX_PAYLOAD_SIZE = 0x7 << 5
    NO_SNOOP = 1 << 11
    MAX_READ_REQUEST_SIZE = 0x7 << 12
    INITIATE_FLR = 1 << 15


# Extended Tag, Phantom Functions and Aux Power PM are not supported: RO 0.
# Initiate FLR is write-only (reads 0): the function acts on the written value.
DEVCTL_WRITABLE: Final = (
    DeviceControl.CORRECTABLE_ERROR_REPORTING
    | DeviceControl.NON_FATAL_ERROR_REPORTING
    | DeviceControl.FATAL_ERROR_REPORTING
    | DeviceControl.UNSUPPORTED_REQUEST_REPORTING
    | DeviceControl.RELAXED_ORDERING
    | DeviceControl.MAX_PAYLOAD_SIZE
    | DeviceControl.NO_SNOOP
    | DeviceControl.MAX_READ_REQUEST_SIZE
)
# Spec defaults: relaxed ordering and no snoop enabled, max read request 512 bytes.
DEVCTL_DEFAULT: Final = DeviceControl.RELAXED_ORDERING | DeviceControl.NO_SNOOP | (0x2 << 12)
DEVSTA_WRITE1_CLEAR: Final = 0x000F  # correctable/non-fatal/fatal/UR detected

LINK_SPEED_2_5GT: Final = 0x1
LINK_WIDTH_X1: Final = 0x1
LINKCAP_DEFAULT: Final = LINK_SPEED_2_5GT | (LINK_WIDTH_X1 << 4)
LINKSTA_DEFAULT: Final = LINK_SPEED_2_5GT | (LINK_WIDTH_X1 << 4)
LINKCTL_WRITABLE: Final = 0x00C3  # ASPM control, common clock, extended synch
LINKCAP2_SPEEDS_2_5GT: Final = 1 << 1
LINKCTL2_TARGET_2_5GT: Final = LINK_SPEED_2_5GT


def define_power_management(cs: ConfigSpace, offset: int, next_cap: int) -> None:
    cs.define(offset, 1, CapabilityId.POWER_MANAGEMENT)
    cs.define(offset + 1, 1, next_cap)
    # No PME, no D1/D2, no aux current: a version and nothing else.
    cs.define(offset + PM_CAPABILITIES, 2, PMC_VERSION_1_2)
    # No_Soft_Reset=1: D3hot -> D0 keeps the function's state, so no reset is owed
    # (and QEMU's vfio does not count PM as a reset method).
    cs.define(
        offset + PM_CONTROL_STATUS,
        2,
        PowerState.D0 | PMCSR_NO_SOFT_RESET,
        writable=PMCSR_POWER_STATE_MASK,
    )
    cs.add_write_filter(offset + PM_CONTROL_STATUS, 2, _keep_supported_power_state)
    cs.define(offset + 6, 2, 0)  # PMCSR_BSE, Data


def _keep_supported_power_state(before: int, after: int) -> int:
    # PCI PM 1.2, PMCSR PowerState: a write of an unsupported state completes
    # normally, but the data is discarded and the state does not change.
    if (after & PMCSR_POWER_STATE_MASK) in SUPPORTED_POWER_STATES:
        return after
    return (after & ~PMCSR_POWER_STATE_MASK) | (before & PMCSR_POWER_STATE_MASK)


def define_msix(
    cs: ConfigSpace,
    offset: int,
    next_cap: int,
    *,
    vectors: int,
    bir: int,
    table_offset: int,
    pba_offset: int,
) -> None:
    if not 1 <= vectors <= MSIX_MAX_VECTORS:
        raise ValueError(f"{vectors} MSI-X vectors: must be 1..{MSIX_MAX_VECTORS}")
    if (table_offset | pba_offset) & MSIX_BIR_MASK or not 0 <= bir <= 5:
        raise ValueError("MSI-X table/PBA offsets must be 8-byte aligned, BIR 0..5")
    cs.define(offset, 1, CapabilityId.MSIX)
    cs.define(offset + 1, 1, next_cap)
    cs.define(
        offset + MSIX_MESSAGE_CONTROL,
        2,
        vectors - 1,
        writable=MSIX_ENABLE | MSIX_FUNCTION_MASK,
    )
    cs.define(offset + MSIX_TABLE, 4, table_offset | bir)
    cs.define(offset + MSIX_PBA, 4, pba_offset | bir)


def define_pci_express(cs: ConfigSpace, offset: int, next_cap: int) -> None:
    cs.define(offset, 1, CapabilityId.PCI_EXPRESS)
    cs.define(offset + 1, 1, next_cap)
    cs.define(
        offset + PCIE_CAPABILITIES, 2, PCIE_CAP_VERSION_2 | (PCIE_TYPE_ENDPOINT << PCIE_TYPE_SHIFT)
    )
    # Max payload 128 bytes (field 0), FLR capable.
    cs.define(
        offset + PCIE_DEVICE_CAPABILITIES,
        4,
        DeviceCapabilities.ROLE_BASED_ERROR_REPORTING
        | DeviceCapabilities.FUNCTION_LEVEL_RESET
        | DEVCAP_ACCEPTABLE_LATENCY_NO_LIMIT,
    )
    cs.define(offset + PCIE_DEVICE_CONTROL, 2, DEVCTL_DEFAULT, writable=DEVCTL_WRITABLE)
    cs.define(offset + PCIE_DEVICE_STATUS, 2, 0, write1_clear=DEVSTA_WRITE1_CLEAR)
    # A plausible x1 2.5 GT/s link; nothing about it is real.
    cs.define(offset + PCIE_LINK_CAPABILITIES, 4, LINKCAP_DEFAULT)
    cs.define(offset + PCIE_LINK_CONTROL, 2, 0, writable=LINKCTL_WRITABLE)
    cs.define(offset + PCIE_LINK_STATUS, 2, LINKSTA_DEFAULT)
    # Slot and root registers (0x14-0x23) are reserved for endpoints: zero.
    cs.define(offset + PCIE_DEVICE_CAPABILITIES_2, 4, 0)
    cs.define(offset + PCIE_DEVICE_CONTROL_2, 2, 0)
    cs.define(offset + PCIE_LINK_CAPABILITIES_2, 4, LINKCAP2_SPEEDS_2_5GT)
    cs.define(offset + PCIE_LINK_CONTROL_2, 2, LINKCTL2_TARGET_2_5GT)


def define_capabilities(
    cs: ConfigSpace, *, msix_vectors: int, msix_bir: int, table_offset: int, pba_offset: int
) -> None:
    """The whole chain, plus the empty extended capability list at 0x100."""
    cs.define(HeaderReg.CAPABILITIES_POINTER, 1, POWER_MANAGEMENT_OFFSET)
    define_power_management(cs, POWER_MANAGEMENT_OFFSET, MSIX_OFFSET)
    define_msix(
        cs,
        MSIX_OFFSET,
        PCI_EXPRESS_OFFSET,
        vectors=msix_vectors,
        bir=msix_bir,
        table_offset=table_offset,
        pba_offset=pba_offset,
    )
    define_pci_express(cs, PCI_EXPRESS_OFFSET, 0)


def capability_list(cs: ConfigSpace) -> list[tuple[int, int]]:
    """Walk the chain as a host would: [(capability ID, offset), ...]."""
    found: list[tuple[int, int]] = []
    pointer = cs.load(HeaderReg.CAPABILITIES_POINTER, 1) & ~0x3
    while pointer and len(found) < 48:  # 48 = (256 - 64) / 4: a loop guard
        found.append((cs.load(pointer, 1), pointer))
        pointer = cs.load(pointer + 1, 1) & ~0x3
    return found


def find_capability(cs: ConfigSpace, cap_id: int) -> int | None:
    for found_id, offset in capability_list(cs):
        if found_id == cap_id:
            return offset
    return None
