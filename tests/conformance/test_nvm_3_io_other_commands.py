"""NVM Command Set 1.2, 3.3.8 Write Zeroes, 3.3.3 Dataset Management, 3.3.1 Compare,
3.3.5 Verify, 3.3.2 Copy (descriptor format 0h), and the refusals: 3.3.7 Write
Uncorrectable and reservations (Base 7.5-7.8); fused Compare and Write (Base 3.4.2)."""

from __future__ import annotations

import pytest
from conformance_support import (
    LAYOUT,
    NS4K,
    NS512,
    NS_RO,
    Device,
    assert_ok,
    assert_status,
    pattern,
    write_blocks,
)

from nvme_mdev.nvme.spec import IoOpcode, Status
from nvme_mdev.nvme_host import (
    HostQueuePair,
    NvmeHost,
    copy,
    copy_range,
    dataset_management,
    dsm_range,
    nvm_command,
    write_zeroes,
)


def _buffer(host: NvmeHost, data: bytes) -> int:
    buf = host.alloc(len(data))
    host.ram.write(buf, data)
    return buf


@pytest.mark.parametrize("deallocate", [False, True], ids=["write", "deallocate"])
def test_3_3_8_write_zeroes_zeroes_the_range_and_nothing_else(
    device: Device, host: NvmeHost, io: HostQueuePair, deallocate: bool
) -> None:
    """Write Zeroes (with or without DEAC): the blocks read back as zeroes; the blocks
    around them are untouched."""
    data = pattern(4 * 4096, 3)
    assert_ok(write_blocks(host, io, NS4K, 20, data))
    assert_ok(io.command(write_zeroes(NS4K, 21, 2, deallocate=deallocate)))
    assert device.stored(NS4K, 20, 4) == data[:4096] + bytes(8192) + data[3 * 4096 :]


def test_3_3_8_write_zeroes_checks_range_and_write_protection(
    host: NvmeHost, io: HostQueuePair
) -> None:
    """Write Zeroes past the namespace: LBA Out of Range; on a write-protected one:
    Namespace is Write Protected."""
    blocks = LAYOUT[NS512].blocks
    assert_status(io.command(write_zeroes(NS512, blocks - 1, 2)), Status.LBA_OUT_OF_RANGE)
    assert_status(io.command(write_zeroes(NS_RO, 0, 1)), Status.NAMESPACE_WRITE_PROTECTED)


def test_3_3_3_dataset_management_deallocate_reads_back_zeroes(
    device: Device, host: NvmeHost, io: HostQueuePair
) -> None:
    """Deallocate (AD) of several ranges: the blocks read back as DLFEAT says (zeroes,
    001b, for a file); ranges of length 0 are ignored."""
    assert host.identify(0, NS4K)[33] & 0x7 == 0b001
    assert_ok(write_blocks(host, io, NS4K, 40, pattern(6 * 4096, 8)))
    ranges = dsm_range(40, 2) + dsm_range(44, 1) + dsm_range(45, 0)
    c = io.command(dataset_management(NS4K, _buffer(host, ranges), 3, deallocate=True))
    assert_ok(c)
    stored = device.stored(NS4K, 40, 6)
    assert stored[: 2 * 4096] == bytes(8192) and stored[4 * 4096 : 5 * 4096] == bytes(4096)
    assert stored[2 * 4096 : 4 * 4096] == pattern(6 * 4096, 8)[2 * 4096 : 4 * 4096]


def test_3_3_3_dataset_management_hints_only_change_nothing(
    device: Device, host: NvmeHost, io: HostQueuePair
) -> None:
    """Without AD the attributes are hints: success, data unchanged."""
    data = pattern(4096, 12)
    assert_ok(write_blocks(host, io, NS4K, 60, data))
    c = io.command(dataset_management(NS4K, _buffer(host, dsm_range(60, 1, 0x3)), 1))
    assert_ok(c)
    assert device.stored(NS4K, 60, 1) == data


def test_3_3_3_dataset_management_range_beyond_the_namespace_is_lba_out_of_range(
    host: NvmeHost, io: HostQueuePair
) -> None:
    """A range past NSZE: LBA Out of Range."""
    ranges = dsm_range(LAYOUT[NS4K].blocks, 1)
    c = io.command(dataset_management(NS4K, _buffer(host, ranges), 1, deallocate=True))
    assert_status(c, Status.LBA_OUT_OF_RANGE, dnr=True)


def test_3_3_3_dataset_management_deallocate_on_a_write_protected_namespace_is_refused(
    host: NvmeHost, io: HostQueuePair
) -> None:
    """Deallocate on a write-protected namespace: Namespace is Write Protected."""
    c = io.command(dataset_management(NS_RO, _buffer(host, dsm_range(0, 1)), 1, deallocate=True))
    assert_status(c, Status.NAMESPACE_WRITE_PROTECTED, dnr=True)


def test_3_3_1_compare_of_equal_data_succeeds_and_of_different_data_fails(
    host: NvmeHost, io: HostQueuePair
) -> None:
    """Compare: success if the blocks equal the host's buffer, Compare Failure (SCT 2h,
    SC 85h) if any byte differs."""
    data = pattern(1024, 21)
    assert_ok(write_blocks(host, io, NS512, 80, data))
    same = _buffer(host, data)
    assert_ok(io.command(nvm_command(IoOpcode.COMPARE, NS512, 80, 2, same)))
    other = _buffer(host, data[:-1] + bytes([data[-1] ^ 1]))
    c = io.command(nvm_command(IoOpcode.COMPARE, NS512, 80, 2, other))
    assert_status(c, Status.COMPARE_FAILURE)


def test_3_3_5_verify_checks_the_range_and_transfers_nothing(
    host: NvmeHost, io: HostQueuePair
) -> None:
    """Verify of readable blocks succeeds (no data pointer needed); a range past NSZE is
    LBA Out of Range."""
    assert_ok(io.command(nvm_command(IoOpcode.VERIFY, NS512, 0, 256)))
    blocks = LAYOUT[NS512].blocks
    c = io.command(nvm_command(IoOpcode.VERIFY, NS512, blocks - 1, 2))
    assert_status(c, Status.LBA_OUT_OF_RANGE, dnr=True)


def test_3_3_2_copy_format_0_copies_the_source_ranges_in_order(
    device: Device, host: NvmeHost, io: HostQueuePair
) -> None:
    """Copy (descriptor format 0h): the source ranges, concatenated in order, are
    written from SDLBA on."""
    a, b = pattern(1024, 30), pattern(512, 31)
    assert_ok(write_blocks(host, io, NS512, 500, a))
    assert_ok(write_blocks(host, io, NS512, 600, b))
    ranges = copy_range(600, 1) + copy_range(500, 2)
    assert_ok(io.command(copy(NS512, 700, _buffer(host, ranges), 2)))
    assert device.stored(NS512, 700, 3) == b + a


def test_3_3_2_copy_with_an_unsupported_descriptor_format_is_invalid_field(
    host: NvmeHost, io: HostQueuePair
) -> None:
    """A descriptor format not set in Identify Controller CDFS: Invalid Field."""
    assert int.from_bytes(host.identify(1)[534:536], "little") & 0b10 == 0
    c = io.command(copy(NS512, 0, _buffer(host, bytes(40)), 1, desc_format=1))
    assert_status(c, Status.INVALID_FIELD, dnr=True)


def test_3_3_2_copy_with_more_ranges_than_msrc_is_command_size_limit_exceeded(
    host: NvmeHost, io: HostQueuePair
) -> None:
    """More source ranges than MSRC + 1: Command Size Limit Exceeded."""
    msrc = host.identify(0, NS512)[80]
    n = msrc + 2
    c = io.command(copy(NS512, 0, _buffer(host, copy_range(0, 1) * n), n))
    assert_status(c, Status.COMMAND_SIZE_LIMIT_EXCEEDED, dnr=True)


def test_3_3_2_copy_to_a_write_protected_namespace_is_refused(
    host: NvmeHost, io: HostQueuePair
) -> None:
    """Copy into a write-protected namespace: Namespace is Write Protected."""
    c = io.command(copy(NS_RO, 10, _buffer(host, copy_range(0, 1)), 1))
    assert_status(c, Status.NAMESPACE_WRITE_PROTECTED, dnr=True)


def test_3_3_7_write_uncorrectable_is_not_supported(host: NvmeHost, io: HostQueuePair) -> None:
    """ONCS bit 1 clear: Write Uncorrectable is Invalid Command Opcode."""
    assert int.from_bytes(host.identify(1)[520:522], "little") & 0b10 == 0
    c = io.command(nvm_command(IoOpcode.WRITE_UNCORRECTABLE, NS512, 0, 1))
    assert_status(c, Status.INVALID_OPCODE, dnr=True)


def test_3_4_2_fused_compare_and_write_writes_only_on_a_match(
    host: NvmeHost, io: HostQueuePair
) -> None:
    """FUSES bit 0 (Compare and Write), ACWU set; the pair's Write runs only if its
    Compare matched: Compare Failure, then Command Aborted due to Failed Fused Command."""
    data = host.identify(1)
    assert int.from_bytes(data[522:524], "little") & 1
    assert int.from_bytes(data[532:534], "little") > 0  # ACWU, 0's based
    old, new = pattern(512, 21), pattern(512, 22)
    assert_ok(write_blocks(host, io, NS512, 3, old))
    compare = nvm_command(IoOpcode.COMPARE, NS512, 3, 1, _buffer(host, old))
    write = nvm_command(IoOpcode.WRITE, NS512, 3, 1, _buffer(host, new))
    compared, written = io.compare_and_write(compare, write)
    assert_ok(compared)
    assert_ok(written)
    compared, written = io.compare_and_write(compare, write)  # the blocks now hold `new`
    assert_status(compared, Status.COMPARE_FAILURE, dnr=True)
    assert_status(written, Status.ABORT_FUSE_FAILED, dnr=True)


@pytest.mark.parametrize("fuse", [2, 3], ids=["second alone", "reserved"])
def test_3_4_2_a_fused_command_without_its_pair(
    host: NvmeHost, io: HostQueuePair, fuse: int
) -> None:
    """A second with no first is Missing Fused Command; FUSE 11b is Invalid Field."""
    dw = nvm_command(IoOpcode.WRITE, NS512, 0, 1, host.alloc(512))
    dw[0] |= fuse << 8
    status = Status.ABORT_FUSE_MISSING if fuse == 2 else Status.INVALID_FIELD
    assert_status(io.command(dw), status, dnr=True)


@pytest.mark.parametrize(
    "opcode",
    [
        IoOpcode.RESERVATION_REGISTER,
        IoOpcode.RESERVATION_REPORT,
        IoOpcode.RESERVATION_ACQUIRE,
        IoOpcode.RESERVATION_RELEASE,
    ],
    ids=lambda o: IoOpcode(o).name.lower(),
)
def test_7_reservation_commands_are_not_supported(
    host: NvmeHost, io: HostQueuePair, opcode: int
) -> None:
    """ONCS bit 5 clear (no reservations): Invalid Command Opcode."""
    assert int.from_bytes(host.identify(1)[520:522], "little") & (1 << 5) == 0
    assert_status(io.command([opcode, NS512]), Status.INVALID_OPCODE, dnr=True)
