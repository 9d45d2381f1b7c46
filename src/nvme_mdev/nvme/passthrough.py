"""What a guest's I/O command must satisfy before it is passed through to a host
NVMe namespace (backends/passthrough.py), and what it transfers.

The host's controller executes the command; we only check what protects the host
or what the host cannot know: the opcode is one of the NVM command set's I/O
commands below (an admin-like or vendor opcode never reaches the host), no fused
pair and no reserved PSDT (the kernel builds its own data pointer), the data
length within our MDTS (what the guest was told, and what the host's queue takes:
the controller refuses a passthrough namespace whose host takes less), the blocks
inside the namespace, and no write to a read-only one (the kernel lets root write
through a descriptor opened read-only, so this check is ours). The range lists of Dataset
Management and Copy are checked by the host controller itself: the namespace is
the host's, whole, so its bounds are ours.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from .errors import CommandError
from .spec import IoOpcode, Status

CDW0_FUSE: Final = 0x3 << 8
CDW0_PSDT: Final = 0x3 << 14
DSM_DEALLOCATE: Final = 1 << 2
_DSM_RANGE_SIZE: Final = 16
#: Copy source range entry sizes by descriptor format (NVM 3.3.2.1): 0h and 1h are
#: formats without and with 64-bit protection information fields.
COPY_DESCRIPTOR_SIZES: Final = {0: 32, 1: 40}

#: opcodes passed through, and whether they write the namespace
ALLOWED_OPCODES: Final[dict[int, bool]] = {
    IoOpcode.FLUSH: False,  # harmless on a read-only namespace (as for files)
    IoOpcode.WRITE: True,
    IoOpcode.READ: False,
    IoOpcode.COMPARE: False,
    IoOpcode.WRITE_ZEROES: True,
    IoOpcode.DATASET_MANAGEMENT: False,  # a write only with Deallocate (AD)
    IoOpcode.VERIFY: False,
    IoOpcode.COPY: True,
}
#: commands whose SLBA/NLB (CDW10-12) name blocks we check against the namespace
_BLOCK_RANGE = frozenset(
    (IoOpcode.READ, IoOpcode.WRITE, IoOpcode.COMPARE, IoOpcode.VERIFY, IoOpcode.WRITE_ZEROES)
)
#: commands that move NLB blocks through the data pointer
_BLOCK_DATA = frozenset((IoOpcode.READ, IoOpcode.WRITE, IoOpcode.COMPARE))


@dataclass(frozen=True)
class Transfer:
    """What a checked command moves through its data pointer."""

    #: bytes (0: no data pointer)
    length: int
    #: the data goes to guest memory (Read); else from it
    to_guest: bool
    #: the first LBA, for the Error Information log
    slba: int


def check(
    dw: tuple[int, ...], blocks: int, lba_shift: int, max_transfer: int, readonly: bool
) -> Transfer:
    """The command in SQE dwords `dw` for a namespace of `blocks` blocks of
    1 << `lba_shift` bytes; CommandError with the status the guest gets if it may not
    be passed through."""
    cdw0 = dw[0]
    opcode = cdw0 & 0xFF
    writes = ALLOWED_OPCODES.get(opcode)
    if writes is None:
        raise CommandError(Status.INVALID_OPCODE, f"opcode {opcode:#x} is not passed through")
    if cdw0 & CDW0_FUSE:
        raise CommandError(Status.INVALID_FIELD, "fused operations are not supported")
    if cdw0 & CDW0_PSDT == CDW0_PSDT:
        raise CommandError(Status.INVALID_FIELD, "PSDT 11b is reserved")
    slba = dw[10] | (dw[11] << 32)
    length = 0
    if opcode in _BLOCK_RANGE:
        nlb = (dw[12] & 0xFFFF) + 1
        if slba + nlb > blocks:
            raise CommandError(Status.LBA_OUT_OF_RANGE, f"LBA {slba}+{nlb} > {blocks}", lba=slba)
        if opcode in _BLOCK_DATA:
            length = nlb << lba_shift
            if length > max_transfer:
                raise CommandError(Status.INVALID_FIELD, f"{length} bytes > MDTS", lba=slba)
    elif opcode == IoOpcode.DATASET_MANAGEMENT:
        length = ((dw[10] & 0xFF) + 1) * _DSM_RANGE_SIZE
        writes = bool(dw[11] & DSM_DEALLOCATE)
        slba = 0
    elif opcode == IoOpcode.COPY:
        desfmt = (dw[12] >> 8) & 0xF
        size = COPY_DESCRIPTOR_SIZES.get(desfmt)
        if size is None:
            raise CommandError(Status.INVALID_FIELD, f"Copy descriptor format {desfmt:#x}")
        if slba >= blocks:
            raise CommandError(Status.LBA_OUT_OF_RANGE, f"Copy to LBA {slba} >= {blocks}")
        length = ((dw[12] & 0xFF) + 1) * size
    if writes and readonly:
        raise CommandError(Status.NAMESPACE_WRITE_PROTECTED, lba=slba)
    return Transfer(length, opcode == IoOpcode.READ, slba)


def host_status(status: int, result: int, lba: int) -> CommandError:
    """The host controller's Status Field (SCT, SC, CRD, More, DNR: the kernel's
    value, no phase tag) and Dword 0, as the guest's completion, unchanged."""
    dnr = bool(status & (1 << 14))
    return CommandError(
        status & 0x3FFF, f"host status {status:#x}", dnr=dnr, lba=lba, result=result
    )
