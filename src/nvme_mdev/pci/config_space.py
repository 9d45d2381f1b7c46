"""PCI configuration space of one function: 4 KiB, a type 0 header, and per-byte
write semantics (PCI Local Bus 3.0 §6.1-6.2, PCIe Base §7.5.1).

Every byte carries two masks: bits the host may overwrite (RW) and bits a
host write of 1 clears (RW1C). Everything else is read-only to the host; the
device changes it with `store()`. Side effects of writes (MSI-X enable, FLR,
...) are not here: the PCI function looks at what changed after `write()`.
"""

from __future__ import annotations

from collections.abc import Callable
from enum import IntEnum, IntFlag
from typing import Final

CONFIG_SPACE_SIZE: Final = 4096
"""PCIe extended configuration space: 256 bytes of PCI header + capabilities,
then extended capabilities from 0x100."""

PCI_CONFIG_SPACE_SIZE: Final = 256
EXTENDED_CAPABILITIES_OFFSET: Final = 0x100

# --- identity ---------------------------------------------------------------------------

VENDOR_ID: Final = 0x4E4D
"""PCI vendor ID ("NM"). Unregistered: chosen for this project so that no
operating-system driver quirk keyed on a real vendor (Linux nvme's quirk table,
QEMU's vfio device quirks) ever applies to this controller. The guest's NVMe
driver binds by class code, not by ID."""

DEVICE_ID: Final = 0x0001
"""PCI device ID under `VENDOR_ID`; unregistered, chosen for this project."""

SUBSYSTEM_VENDOR_ID: Final = 0x4E4D
"""Subsystem vendor ID; unregistered, chosen for this project (same as `VENDOR_ID`)."""

SUBSYSTEM_ID: Final = 0x0001
"""Subsystem ID; unregistered, chosen for this project."""

REVISION_ID: Final = 0x01
"""Revision of this PCI function's design."""

CLASS_CODE: Final = 0x010802
"""Base class 01h mass storage, subclass 08h non-volatile memory, programming
interface 02h NVM Express (NVMe over PCIe transport spec §3.1)."""


class HeaderReg(IntEnum):
    """Type 0 header register offsets (PCI Local Bus 3.0 §6.1)."""

    VENDOR_ID = 0x00
    DEVICE_ID = 0x02
    COMMAND = 0x04
    STATUS = 0x06
    REVISION_ID = 0x08
    CLASS_CODE = 0x09  # 3 bytes: programming interface, subclass, base class
    CACHE_LINE_SIZE = 0x0C
    LATENCY_TIMER = 0x0D
    HEADER_TYPE = 0x0E
    BIST = 0x0F
    BAR0 = 0x10
    CARDBUS_CIS = 0x28
    SUBSYSTEM_VENDOR_ID = 0x2C
    SUBSYSTEM_ID = 0x2E
    EXPANSION_ROM = 0x30
    CAPABILITIES_POINTER = 0x34
    INTERRUPT_LINE = 0x3C
    INTERRUPT_PIN = 0x3D
    MIN_GNT = 0x3E
    MAX_LAT = 0x3F


class Command(IntFlag):
    IO_SPACE = 1 << 0
    MEMORY_SPACE = 1 << 1
    BUS_MASTER = 1 << 2
    SPECIAL_CYCLES = 1 << 3
    MEMORY_WRITE_INVALIDATE = 1 << 4
    VGA_PALETTE_SNOOP = 1 << 5
    PARITY_ERROR_RESPONSE = 1 << 6
    SERR_ENABLE = 1 << 8
    FAST_BACK_TO_BACK = 1 << 9
    INTX_DISABLE = 1 << 10


# No I/O BARs, so I/O space stays 0. Parity Error Response and SERR# Enable are
# required to be RW on PCIe functions even though we never report errors.
COMMAND_WRITABLE: Final = (
    Command.MEMORY_SPACE
    | Command.BUS_MASTER
    | Command.PARITY_ERROR_RESPONSE
    | Command.SERR_ENABLE
    | Command.INTX_DISABLE
)


class Status(IntFlag):
    INTERRUPT_STATUS = 1 << 3
    CAPABILITIES_LIST = 1 << 4
    MASTER_DATA_PARITY_ERROR = 1 << 8
    SIGNALED_TARGET_ABORT = 1 << 11
    RECEIVED_TARGET_ABORT = 1 << 12
    RECEIVED_MASTER_ABORT = 1 << 13
    SIGNALED_SYSTEM_ERROR = 1 << 14
    DETECTED_PARITY_ERROR = 1 << 15


STATUS_WRITE1_CLEAR: Final = (
    Status.MASTER_DATA_PARITY_ERROR
    | Status.SIGNALED_TARGET_ABORT
    | Status.RECEIVED_TARGET_ABORT
    | Status.RECEIVED_MASTER_ABORT
    | Status.SIGNALED_SYSTEM_ERROR
    | Status.DETECTED_PARITY_ERROR
)

INTERRUPT_PIN_INTA: Final = 1

# BAR low bits (PCI Local Bus 3.0 §6.2.5.1)
BAR_MEMORY_64BIT: Final = 0b100
BAR_PREFETCHABLE: Final = 0b1000
BAR_MEMORY_FLAGS_MASK: Final = 0xF

BAR0_INDEX: Final = 0
BAR0_MIN_SIZE: Final = 16 * 1024
"""Windows' NVMe driver assumes BAR0 covers at least 16 KiB."""

MSIX_BAR_INDEX: Final = 4
"""BAR4: a 32-bit non-prefetchable memory BAR holding only the MSI-X table and
PBA (the layout QEMU's own devices use for an exclusive MSI-X BAR). BAR0/1 is
the 64-bit register BAR; BAR2, BAR3 and BAR5 are unimplemented."""


def bar_offset(index: int) -> int:
    return HeaderReg.BAR0 + 4 * index


WriteFilter = Callable[[int, int], int]
"""(value before the write, value after masking) -> value to keep."""


class ConfigSpace:
    """Configuration-space bytes with per-byte RW and RW1C masks.

    Not thread-safe: the PCI function serialises access.
    """

    def __init__(self) -> None:
        self._data = bytearray(CONFIG_SPACE_SIZE)
        self._writable = bytearray(CONFIG_SPACE_SIZE)
        self._write1_clear = bytearray(CONFIG_SPACE_SIZE)
        self._defaults = bytes(CONFIG_SPACE_SIZE)
        self._filters: list[tuple[int, int, WriteFilter]] = []

    # --- layout (device side) -------------------------------------------------------

    def define(
        self, offset: int, size: int, value: int, *, writable: int = 0, write1_clear: int = 0
    ) -> None:
        """Lay out a register: its power-on value and which bits the host may change."""
        _check_range(offset, size)
        if writable & write1_clear:
            raise ValueError(f"register {offset:#x}: bits both RW and RW1C")
        self._data[offset : offset + size] = value.to_bytes(size, "little")
        self._writable[offset : offset + size] = writable.to_bytes(size, "little")
        self._write1_clear[offset : offset + size] = write1_clear.to_bytes(size, "little")

    def add_write_filter(self, offset: int, size: int, write_filter: WriteFilter) -> None:
        """Let a register veto or adjust host writes (e.g. unsupported power states)."""
        _check_range(offset, size)
        self._filters.append((offset, size, write_filter))

    def set_defaults(self) -> None:
        """Freeze the current contents as the power-on/reset state."""
        self._defaults = bytes(self._data)

    def reset(self) -> None:
        self._data[:] = self._defaults

    def contents(self) -> bytes:
        """All of it as the host last left it (for a successor process)."""
        return bytes(self._data)

    def restore(self, data: bytes) -> None:
        if len(data) != len(self._data):
            raise ValueError(f"config space of {len(data)} bytes")
        self._data[:] = data

    # --- device-side access ---------------------------------------------------------------

    def load(self, offset: int, size: int) -> int:
        _check_range(offset, size)
        return int.from_bytes(self._data[offset : offset + size], "little")

    def store(self, offset: int, size: int, value: int) -> None:
        """Set a register as the device, ignoring write masks."""
        _check_range(offset, size)
        self._data[offset : offset + size] = value.to_bytes(size, "little")

    def writable_mask(self, offset: int, size: int) -> int:
        _check_range(offset, size)
        return int.from_bytes(self._writable[offset : offset + size], "little")

    def write1_clear_mask(self, offset: int, size: int) -> int:
        _check_range(offset, size)
        return int.from_bytes(self._write1_clear[offset : offset + size], "little")

    # --- host access ------------------------------------------------------------------

    def read(self, offset: int, size: int) -> bytes:
        _check_range(offset, size)
        return bytes(self._data[offset : offset + size])

    def write(self, offset: int, data: bytes) -> None:
        """A host write of any length: only RW bits take the new value, RW1C bits
        written as 1 clear, everything else keeps its value."""
        _check_range(offset, len(data))
        end = offset + len(data)
        touched = [
            (off, size, f, self.load(off, size))
            for off, size, f in self._filters
            if off < end and offset < off + size
        ]
        mem, wmask, w1c = self._data, self._writable, self._write1_clear
        for i, byte in enumerate(data, offset):
            keep = mem[i] & ~wmask[i]
            mem[i] = (keep | (byte & wmask[i])) & ~(byte & w1c[i])
        for off, size, f, before in touched:
            self.store(off, size, f(before, self.load(off, size)))


def written_value(offset: int, data: bytes, field: int, size: int) -> tuple[int, int] | None:
    """What a host write of `data` at `offset` put on the wire for the register at
    `field` (before any masking): (value, mask of bits written), or None if the
    write does not touch it. Used for write-only command bits such as Initiate FLR."""
    lo, hi = max(offset, field), min(offset + len(data), field + size)
    if lo >= hi:
        return None
    value = mask = 0
    for pos in range(lo, hi):
        shift = 8 * (pos - field)
        value |= data[pos - offset] << shift
        mask |= 0xFF << shift
    return value, mask


def define_type0_header(cs: ConfigSpace, *, bar0_size: int, msix_bar_size: int) -> None:
    """The standard header of our NVMe function. Capabilities are added separately."""
    if bar0_size < BAR0_MIN_SIZE or bar0_size & (bar0_size - 1):
        raise ValueError(f"BAR0 size {bar0_size:#x}: must be a power of two >= 16 KiB")
    if msix_bar_size < 4096 or msix_bar_size & (msix_bar_size - 1) or msix_bar_size > 1 << 31:
        raise ValueError(f"MSI-X BAR size {msix_bar_size:#x}: power of two, 4 KiB..2 GiB")
    cs.define(HeaderReg.VENDOR_ID, 2, VENDOR_ID)
    cs.define(HeaderReg.DEVICE_ID, 2, DEVICE_ID)
    cs.define(HeaderReg.COMMAND, 2, 0, writable=COMMAND_WRITABLE)
    cs.define(HeaderReg.STATUS, 2, Status.CAPABILITIES_LIST, write1_clear=STATUS_WRITE1_CLEAR)
    cs.define(HeaderReg.REVISION_ID, 1, REVISION_ID)
    cs.define(HeaderReg.CLASS_CODE, 3, CLASS_CODE)
    # Cache Line Size is RW for compatibility but has no effect on PCIe.
    cs.define(HeaderReg.CACHE_LINE_SIZE, 1, 0, writable=0xFF)
    cs.define(HeaderReg.LATENCY_TIMER, 1, 0)  # RO 0 on PCIe
    cs.define(HeaderReg.HEADER_TYPE, 1, 0x00)  # type 0, single function
    cs.define(HeaderReg.BIST, 1, 0)
    define_memory_bar(cs, BAR0_INDEX, bar0_size, is_64bit=True)
    define_memory_bar(cs, MSIX_BAR_INDEX, msix_bar_size, is_64bit=False)
    cs.define(HeaderReg.SUBSYSTEM_VENDOR_ID, 2, SUBSYSTEM_VENDOR_ID)
    cs.define(HeaderReg.SUBSYSTEM_ID, 2, SUBSYSTEM_ID)
    # No expansion ROM: the register reads 0 even after sizing, so clients (QEMU's
    # vfio ROM probe) compute size 0.
    cs.define(HeaderReg.EXPANSION_ROM, 4, 0)
    cs.define(HeaderReg.INTERRUPT_LINE, 1, 0, writable=0xFF)
    cs.define(HeaderReg.INTERRUPT_PIN, 1, INTERRUPT_PIN_INTA)


def define_memory_bar(
    cs: ConfigSpace, index: int, size: int, *, is_64bit: bool, prefetchable: bool = False
) -> None:
    """A memory BAR: its address bits above the size are RW, so writing all ones and
    reading back yields the size mask (PCI Local Bus 3.0 §6.2.5.1)."""
    if size < 16 or size & (size - 1):
        raise ValueError(f"BAR{index} size {size:#x} is not a power of two >= 16")
    flags = (BAR_MEMORY_64BIT if is_64bit else 0) | (BAR_PREFETCHABLE if prefetchable else 0)
    width = 8 if is_64bit else 4
    if is_64bit and index % 2:
        raise ValueError("a 64-bit BAR takes an even index and the next one")
    if not is_64bit and size > 1 << 31:
        raise ValueError("a 32-bit BAR holds at most 2 GiB")
    address_mask = ~(size - 1) & ((1 << (8 * width)) - 1) & ~BAR_MEMORY_FLAGS_MASK
    cs.define(bar_offset(index), width, flags, writable=address_mask)


def _check_range(offset: int, size: int) -> None:
    if offset < 0 or size < 0 or offset + size > CONFIG_SPACE_SIZE:
        raise ValueError(f"config space access {offset:#x}+{size} outside 4 KiB")
