"""NVMe Base 2.2, 5.1.12 Get Log Page: NUMDL/NUMDU, LPOL/LPOU, RAE, the log pages the
controller supports, and the Error Information log entries (5.1.12, Figure 'Error
Information Log Entry Data Structure'; 4.2.3 Status Field)."""

from __future__ import annotations

import struct

import pytest
from conformance_support import NS512, assert_ok, assert_status, read_blocks, write_blocks

from nvme_mdev.nvme.admin.log_pages import SUPPORTED_LOGS
from nvme_mdev.nvme.spec import AdminOpcode, FeatureId, IoOpcode, LogPage, Status
from nvme_mdev.nvme_host import HostQueuePair, NvmeHost, get_log_page, nvm_command

#: Log pages an I/O controller shall support, written out from the specification (not
#: from the device's tables): NVMe Base 2.2, 3.1.3.5 Figure 31 'Log Page Support
#: Requirements', I/O column M (SMART / Health: controller scope). NVMe-MI Commands
#: Supported and Effects (13h) is M only with the NVMe-MI Send/Receive commands, the
#: Reachability pages (1Ah, 1Bh) only with Reachability Reporting; NVM Command Set 1.2,
#: 2.2 Figure 15 adds no mandatory one.
MANDATORY = [
    LogPage.SUPPORTED_LOG_PAGES,  # 00h
    LogPage.ERROR_INFORMATION,  # 01h
    LogPage.SMART_HEALTH,  # 02h
    LogPage.FIRMWARE_SLOT,  # 03h
    LogPage.COMMANDS_SUPPORTED_AND_EFFECTS,  # 05h
    LogPage.FEATURE_IDENTIFIERS_SUPPORTED,  # 12h
]
#: the mandatory log pages and the optional ones the device reports
REPORTED = sorted(set(MANDATORY) | set(SUPPORTED_LOGS))
LOG_SIZE: dict[int, int] = {
    LogPage.SUPPORTED_LOG_PAGES: 1024,
    LogPage.ERROR_INFORMATION: 64 * 64,
    LogPage.SMART_HEALTH: 512,
    LogPage.FIRMWARE_SLOT: 512,
    LogPage.CHANGED_NAMESPACE_LIST: 4096,
    LogPage.COMMANDS_SUPPORTED_AND_EFFECTS: 4096,
    LogPage.FEATURE_IDENTIFIERS_SUPPORTED: 1024,
}
UNSUPPORTED = sorted(set(LogPage) - set(REPORTED))


def _u128(data: bytes, offset: int) -> int:
    return int.from_bytes(data[offset : offset + 16], "little")


@pytest.mark.parametrize("lid", REPORTED, ids=lambda lid: LogPage(lid).name.lower())
def test_5_1_12_every_supported_log_page_is_listed_and_readable(host: NvmeHost, lid: int) -> None:
    """Supported Log Pages has LSUPP set for each mandatory log page and each optional
    one the controller reports, and each of them can be read."""
    c, supported = host.get_log_page(LogPage.SUPPORTED_LOG_PAGES, 1024)
    assert_ok(c)
    assert struct.unpack_from("<I", supported, lid * 4)[0] & 1
    c, _ = host.get_log_page(lid, LOG_SIZE[lid], rae=True)
    assert_ok(c)


@pytest.mark.parametrize("lid", UNSUPPORTED, ids=lambda lid: LogPage(lid).name.lower())
def test_5_1_12_unsupported_log_page_is_invalid_log_page(host: NvmeHost, lid: int) -> None:
    """A log page the controller does not support: Invalid Log Page, DNR; and it is not
    listed in Supported Log Pages."""
    c, _ = host.get_log_page(lid, 512)
    assert_status(c, Status.INVALID_LOG_PAGE, dnr=True)
    _, supported = host.get_log_page(LogPage.SUPPORTED_LOG_PAGES, 1024)
    assert struct.unpack_from("<I", supported, lid * 4)[0] == 0


def test_5_1_12_numdl_limits_the_transfer_to_the_dwords_asked_for(host: NvmeHost) -> None:
    """NUMD (0's based dwords): the controller transfers that much and no more."""
    buf = host.alloc(4096)
    host.ram.write(buf, b"\xaa" * 4096)
    c = host.admin_command(get_log_page(LogPage.SMART_HEALTH, buf, 16))
    assert_ok(c)
    assert host.ram.read(buf, 2) != b"\xaa\xaa"  # critical warning + temperature written
    assert host.ram.read(buf + 16, 4096 - 16) == b"\xaa" * (4096 - 16)


def test_5_1_12_numdu_holds_the_upper_16_bits_of_the_dword_count(host: NvmeHost) -> None:
    """NUMDU:NUMDL form one count: 65537 dwords (NUMDU 1, NUMDL 0) are transferred,
    the log's bytes first."""
    _, whole = host.get_log_page(LogPage.COMMANDS_SUPPORTED_AND_EFFECTS, 4096)
    c, data = host.get_log_page(LogPage.COMMANDS_SUPPORTED_AND_EFFECTS, 65537 * 4)
    assert_ok(c)
    assert data[:4096] == whole
    assert data[4096:] == bytes(len(data) - 4096)


def test_5_1_12_lpol_selects_the_byte_offset_into_the_log(host: NvmeHost) -> None:
    """LPOL/LPOU: the transfer starts at that byte of the log page."""
    _, whole = host.get_log_page(LogPage.COMMANDS_SUPPORTED_AND_EFFECTS, 4096)
    c, part = host.get_log_page(LogPage.COMMANDS_SUPPORTED_AND_EFFECTS, 1024, offset=1024)
    assert_ok(c)
    assert part == whole[1024:2048]


def test_5_1_12_offset_past_the_end_of_the_log_is_invalid_field(host: NvmeHost) -> None:
    """An offset (LPOU:LPOL) beyond the log page's size: Invalid Field in Command."""
    c, _ = host.get_log_page(LogPage.SMART_HEALTH, 512, offset=1 << 32)
    assert_status(c, Status.INVALID_FIELD, dnr=True)


def test_5_1_12_offset_not_dword_aligned_is_invalid_field(host: NvmeHost) -> None:
    """LPOL bits 1:0 are reserved: an unaligned offset is Invalid Field in Command."""
    c, _ = host.get_log_page(LogPage.SMART_HEALTH, 64, offset=2)
    assert_status(c, Status.INVALID_FIELD, dnr=True)


def test_5_1_12_smart_for_one_namespace_without_lpa_bit_0_is_invalid_field(
    host: NvmeHost,
) -> None:
    """LPA bit 0 clear (no per-namespace SMART): an NSID other than 0h/FFFFFFFFh is
    Invalid Field in Command."""
    assert host.identify(1)[261] & 1 == 0
    c, _ = host.get_log_page(LogPage.SMART_HEALTH, 512, nsid=NS512)
    assert_status(c, Status.INVALID_FIELD, dnr=True)


def test_5_1_12_smart_counts_host_commands_and_data_units(
    host: NvmeHost, io: HostQueuePair
) -> None:
    """SMART / Health: Host Read/Write Commands and Data Units Read/Written (thousands
    of 512-byte units, rounded up) follow the host's I/O."""
    _, before = host.get_log_page(LogPage.SMART_HEALTH, 512)
    for i in range(3):
        assert_ok(write_blocks(host, io, NS512, i * 8, bytes(4096)))
    assert_ok(read_blocks(host, io, NS512, 0, 8)[0])
    _, after = host.get_log_page(LogPage.SMART_HEALTH, 512)
    assert _u128(after, 80) - _u128(before, 80) == 3  # Host Write Commands
    assert _u128(after, 64) - _u128(before, 64) == 1  # Host Read Commands
    assert _u128(after, 48) >= _u128(before, 48) + 1  # Data Units Written
    assert _u128(after, 32) >= 1  # Data Units Read


def test_5_1_12_commands_supported_and_effects_matches_what_the_controller_runs(
    host: NvmeHost,
) -> None:
    """CSUPP is set for the commands the controller supports and clear for those it
    refuses (Format NVM, Write Uncorrectable)."""
    _, log = host.get_log_page(LogPage.COMMANDS_SUPPORTED_AND_EFFECTS, 4096)

    def admin(op: int) -> int:
        return int(struct.unpack_from("<I", log, op * 4)[0])

    def io(op: int) -> int:
        return int(struct.unpack_from("<I", log, 1024 + op * 4)[0])

    for admin_op in (AdminOpcode.IDENTIFY, AdminOpcode.ABORT, AdminOpcode.GET_LOG_PAGE):
        assert admin(admin_op) & 1
    for op in (IoOpcode.READ, IoOpcode.WRITE, IoOpcode.FLUSH, IoOpcode.COPY):
        assert io(op) & 1
    assert io(IoOpcode.WRITE) & 0b10  # LBCC: changes logical block content
    assert admin(AdminOpcode.FORMAT_NVM) == 0
    assert io(IoOpcode.WRITE_UNCORRECTABLE) == 0


def test_5_1_12_firmware_slot_reports_the_active_slot_and_its_revision(host: NvmeHost) -> None:
    """Firmware Slot Information: AFI names the active slot; its FRS holds the revision
    Identify Controller reports in FR."""
    _, log = host.get_log_page(LogPage.FIRMWARE_SLOT, 512)
    slot = log[0] & 0x7
    assert slot == 1
    assert log[8 * slot : 8 * slot + 8] == host.identify(1)[64:72]


def _last_error(host: NvmeHost) -> tuple[int, int, int, int, int, int]:
    """(Error Count, SQID, CID, Status Field, Parameter Error Location, NSID) of the
    newest entry."""
    c, log = host.get_log_page(LogPage.ERROR_INFORMATION, 64)
    assert_ok(c)
    count, sqid, cid, status, location, _lba, nsid = struct.unpack_from("<QHHHHQI", log, 0)
    return count, sqid, cid, status, location, nsid


def test_5_1_12_error_log_records_a_failed_admin_command(host: NvmeHost) -> None:
    """A failed command adds an entry (newest first): a new Error Count, the SQID, CID,
    and its Status Field (bits 15:1; bit 0 the phase tag)."""
    before = _last_error(host)[0]
    assert host.admin is not None
    c = host.admin.command([AdminOpcode.NAMESPACE_MANAGEMENT])
    assert_status(c, Status.INVALID_OPCODE, dnr=True)
    count, sqid, cid, status, _, _ = _last_error(host)
    assert count == before + 1
    assert (sqid, cid) == (0, c.cid)
    assert status >> 1 == c.status


def test_5_1_12_error_log_records_a_failed_io_command_with_its_namespace(
    host: NvmeHost, io: HostQueuePair
) -> None:
    """An I/O command error is logged with its SQID, CID, status and NSID."""
    before = _last_error(host)[0]
    c = io.command(nvm_command(IoOpcode.READ, NS512, slba=1 << 40, nlb=1, prp1=host.alloc(512)))
    assert_status(c, Status.LBA_OUT_OF_RANGE, dnr=True)
    count, sqid, cid, status, _, nsid = _last_error(host)
    assert (count, sqid, cid, status >> 1, nsid) == (before + 1, 1, c.cid, c.status, NS512)


def test_5_1_12_error_log_entries_beyond_those_used_are_zero(host: NvmeHost) -> None:
    """Entries not yet used report Error Count 0h; used ones count down from the newest."""
    c, log = host.get_log_page(LogPage.ERROR_INFORMATION, 64 * 64)
    assert_ok(c)
    counts = [struct.unpack_from("<Q", log, i * 64)[0] for i in range(64)]
    used = [n for n in counts if n]
    assert used == sorted(used, reverse=True)
    assert counts == used + [0] * (64 - len(used))


def test_5_1_12_feature_identifiers_supported_lists_exactly_the_supported_features(
    host: NvmeHost,
) -> None:
    """Feature Identifiers Supported and Effects: FSUPP set for each feature Get Features
    answers, clear for the others."""
    c, log = host.get_log_page(LogPage.FEATURE_IDENTIFIERS_SUPPORTED, 1024)
    assert_ok(c)
    for fid in FeatureId:
        fsupp = struct.unpack_from("<I", log, fid * 4)[0] & 1
        vector = 1 if fid == FeatureId.INTERRUPT_VECTOR_CONFIG else 0
        answered, _ = host.get_features(fid, cdw11=vector, data_length=4096)
        assert fsupp == int(answered.ok), FeatureId(fid).name
