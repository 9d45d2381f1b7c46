"""Get Log Page (NVMe Base 2.0, Get Log Page command and its log pages)."""

from __future__ import annotations

import pytest
from harness import PAGE, Host, NamespaceFactory, rw, u16, u32, u64, u128, with_dnr

from nvme_mdev.nvme.spec import AdminOpcode, IoOpcode, LogPage, Status

ERROR_ENTRY = 64


def smart(h: Host) -> bytes:
    c, data = h.get_log(LogPage.SMART_HEALTH, 512)
    assert c.status == 0
    return data


def test_error_log_after_an_error(host: Host) -> None:
    c = host.admin_cmd([0xC5, 0x1234])  # vendor specific: Invalid Opcode
    assert c.status == with_dnr(Status.INVALID_OPCODE)
    bad_cid = c.cid
    c, log = host.get_log(LogPage.ERROR_INFORMATION, ERROR_ENTRY)
    assert c.status == 0
    assert u64(log, 0) == 1  # error count
    assert u16(log, 8) == 0  # SQID
    assert u16(log, 10) == bad_cid
    assert u16(log, 12) == with_dnr(Status.INVALID_OPCODE) << 1  # status field, phase 0
    assert u16(log, 14) == 0xFFFF  # parameter error location: not given
    assert u32(log, 24) == 0x1234  # NSID of the command
    assert smart_error_entries(host) == 1


def smart_error_entries(h: Host) -> int:
    return u128(smart(h), 176)


def test_error_log_newest_first_and_io_errors(host: Host) -> None:
    host.create_io_queue_pair(1)
    host.admin_cmd([0xC5])
    buf = host.alloc(PAGE)
    c = host.io_cmd(1, rw(IoOpcode.READ, 1, buf, 1 << 40, 1))
    assert c.status == with_dnr(Status.LBA_OUT_OF_RANGE)
    _, log = host.get_log(LogPage.ERROR_INFORMATION, 2 * ERROR_ENTRY)
    assert (u64(log, 0), u16(log, 8), u16(log, 10)) == (2, 1, c.cid)
    assert u16(log, 12) >> 1 == with_dnr(Status.LBA_OUT_OF_RANGE)
    assert u32(log, 24) == 1
    assert u64(log, 64) == 1 and u16(log, 64 + 8) == 0


def test_error_log_is_elpe_plus_one_entries(host: Host) -> None:
    """The log is ELPE + 1 = 64 entries; unused entries are zero (error count 0h: invalid)."""
    host.admin_cmd([0xC5])
    c, log = host.get_log(LogPage.ERROR_INFORMATION, 64 * ERROR_ENTRY)
    assert c.status == 0
    assert u64(log, 0) == 1
    assert log[ERROR_ENTRY:] == bytes(63 * ERROR_ENTRY)
    # An offset inside the log but past the entries recorded so far is valid.
    c, log = host.get_log(LogPage.ERROR_INFORMATION, ERROR_ENTRY, offset=10 * ERROR_ENTRY)
    assert c.status == 0 and log == bytes(ERROR_ENTRY)
    c, _ = host.get_log(LogPage.ERROR_INFORMATION, 4, offset=64 * ERROR_ENTRY + 4)
    assert c.status == with_dnr(Status.INVALID_FIELD)


def test_smart_static_fields(host: Host) -> None:
    data = smart(host)
    assert data[0] == 0  # critical warning
    assert u16(data, 1) == 313  # composite temperature, Kelvin
    assert data[3] == 100 and data[4] == 10 and data[5] == 0
    assert u128(data, 112) == 1  # power cycles
    assert u128(data, 144) == 0  # unsafe shutdowns


@pytest.mark.parametrize("nsid", [0, 0xFFFFFFFF])
def test_smart_controller_wide_nsids(host: Host, nsid: int) -> None:
    c, _ = host.get_log(LogPage.SMART_HEALTH, 512, nsid=nsid)
    assert c.status == 0


def test_smart_per_namespace_not_supported(host: Host) -> None:
    """LPA bit 0 is clear: a namespace's own SMART log is Invalid Field."""
    c, _ = host.get_log(LogPage.SMART_HEALTH, 512, nsid=1)
    assert c.status == with_dnr(Status.INVALID_FIELD)


def test_smart_counters_follow_io(host: Host) -> None:
    host.create_io_queue_pair(1)
    buf = host.alloc(128 * PAGE)
    prp1, prp2 = host.prps(buf, 1000 * 512)
    assert u128(smart(host), 32) == 0 and u128(smart(host), 48) == 0

    assert host.io_cmd(1, rw(IoOpcode.WRITE, 1, buf, 0, 1)).status == 0
    d = smart(host)
    assert u128(d, 48) == 1  # one 512-byte unit rounds up to 1 thousand
    assert u128(d, 80) == 1  # host write commands
    assert u128(d, 32) == 0 and u128(d, 64) == 0

    # 1 + 999 = 1,000 units: still 1; one more makes 2.
    assert host.io_cmd(1, rw(IoOpcode.WRITE, 1, prp1, 0, 999, prp2)).status == 0
    assert u128(smart(host), 48) == 1
    assert host.io_cmd(1, rw(IoOpcode.WRITE, 1, buf, 5, 1)).status == 0
    d = smart(host)
    assert u128(d, 48) == 2 and u128(d, 80) == 3

    assert host.io_cmd(1, rw(IoOpcode.READ, 1, prp1, 0, 1000, prp2)).status == 0
    d = smart(host)
    assert u128(d, 32) == 1 and u128(d, 64) == 1
    assert host.io_cmd(1, rw(IoOpcode.READ, 1, buf, 0, 1)).status == 0
    assert u128(smart(host), 32) == 2

    # Failed commands are not counted as host commands.
    assert host.io_cmd(1, rw(IoOpcode.READ, 1, buf, 1 << 30, 1)).status != 0
    assert u128(smart(host), 64) == 2


def test_smart_data_units_with_4k_blocks(file_ns: NamespaceFactory) -> None:
    h = Host([file_ns(block_size=4096)])
    h.enable()
    h.create_io_queue_pair(1)
    buf = h.alloc(PAGE)
    assert h.io_cmd(1, rw(IoOpcode.WRITE, 1, buf, 0, 1)).status == 0  # 8 units of 512
    assert u128(smart(h), 48) == 1
    assert u128(smart(h), 80) == 1


def test_firmware_slot(host: Host) -> None:
    c, data = host.get_log(LogPage.FIRMWARE_SLOT, 512)
    assert c.status == 0
    assert data[0] == 1  # AFI: slot 1 active
    assert data[8:16] == b"0.1.0   "  # FRS1
    assert data[16:] == bytes(512 - 16)


def test_changed_namespace_list(host: Host) -> None:
    host.ctrl.changed_namespaces.update({7, 3})
    c, data = host.get_log(LogPage.CHANGED_NAMESPACE_LIST, PAGE, rae=True)
    assert c.status == 0
    assert (u32(data, 0), u32(data, 4), u32(data, 8)) == (3, 7, 0)
    # RAE kept it; a read without RAE returns it and clears it.
    _, data = host.get_log(LogPage.CHANGED_NAMESPACE_LIST, PAGE)
    assert (u32(data, 0), u32(data, 4)) == (3, 7)
    _, data = host.get_log(LogPage.CHANGED_NAMESPACE_LIST, PAGE)
    assert data == bytes(PAGE)


def test_changed_namespace_list_overflow(host: Host) -> None:
    host.ctrl.changed_namespaces.update(range(1, 1100))
    _, data = host.get_log(LogPage.CHANGED_NAMESPACE_LIST, PAGE)
    assert u32(data, 0) == 0xFFFFFFFF and u32(data, 4) == 0


def test_commands_supported_and_effects(host: Host) -> None:
    c, data = host.get_log(LogPage.COMMANDS_SUPPORTED_AND_EFFECTS, PAGE)
    assert c.status == 0
    for opcode in (0x00, 0x01, 0x02, 0x04, 0x05, 0x06, 0x08, 0x09, 0x0A, 0x0C, 0x18, 0x7C):
        assert u32(data, opcode * 4) & 1, hex(opcode)  # CSUPP
    for opcode in (AdminOpcode.FORMAT_NVM, AdminOpcode.NAMESPACE_MANAGEMENT, 0x03, 0xC0):
        assert u32(data, opcode * 4) == 0, hex(opcode)
    io = 1024
    for opcode in (IoOpcode.READ, IoOpcode.COMPARE, IoOpcode.VERIFY):
        assert u32(data, io + opcode * 4) == 1, opcode  # CSUPP
    for opcode in (
        IoOpcode.WRITE,
        IoOpcode.WRITE_ZEROES,
        IoOpcode.DATASET_MANAGEMENT,
        IoOpcode.COPY,
    ):
        assert u32(data, io + opcode * 4) == 0b11, opcode  # CSUPP | LBCC
    assert u32(data, io + IoOpcode.FLUSH * 4) & 1
    for opcode in (IoOpcode.WRITE_UNCORRECTABLE, 0x03, IoOpcode.RESERVATION_REGISTER):
        assert u32(data, io + opcode * 4) == 0, opcode  # not supported
    assert data[2048:] == bytes(2048)


def test_supported_log_pages(host: Host) -> None:
    c, data = host.get_log(LogPage.SUPPORTED_LOG_PAGES, 1024)
    assert c.status == 0
    supported = [lid for lid in range(256) if u32(data, lid * 4) & 1]
    assert supported == [0x00, 0x01, 0x02, 0x03, 0x04, 0x05, 0x12]


def test_feature_identifiers_supported_and_effects(host: Host) -> None:
    """Every FID marked supported answers Get Features; every other one is refused."""
    c, data = host.get_log(LogPage.FEATURE_IDENTIFIERS_SUPPORTED, 1024)
    assert c.status == 0
    supported = {fid for fid in range(256) if u32(data, fid * 4) & 1}
    # Mandatory for an I/O controller on PCIe: Base 2.2 Figure 32 (01h, 02h, 04h, 07h,
    # 08h, 09h, 0Bh) and NVM Command Set 1.2 Figure 16 (05h, 0Ah).
    assert {0x01, 0x02, 0x04, 0x05, 0x07, 0x08, 0x09, 0x0A, 0x0B} <= supported
    for fid in range(1, 0x20):
        assert (host.get_feature(fid).status == 0) == (fid in supported), hex(fid)
        if fid in supported:
            assert u32(data, fid * 4) == 1 | 1 << 21  # FSUPP, controller scope, no effects


def test_get_log_page_offset_and_length(host: Host) -> None:
    full = smart(host)
    c, part = host.get_log(LogPage.SMART_HEALTH, 16, offset=112)
    assert c.status == 0 and part == full[112:128]
    # Asking for more than the log: the rest of the buffer is written (zeroes here).
    c, more = host.get_log(LogPage.SMART_HEALTH, 1024)
    assert c.status == 0 and more[:512] == full and more[512:] == bytes(512)
    # Offset exactly at the end is not past it.
    c, tail = host.get_log(LogPage.SMART_HEALTH, 4, offset=512)
    assert c.status == 0 and tail == bytes(4)


def test_get_log_page_numdu_extends_the_length(host: Host) -> None:
    """NUMDL/NUMDU form one 0's based dword count: 0x10001 dwords uses NUMDU = 1."""
    length = 0x10001 * 4
    c, data = host.get_log(LogPage.COMMANDS_SUPPORTED_AND_EFFECTS, length)
    assert c.status == 0
    _, page = host.get_log(LogPage.COMMANDS_SUPPORTED_AND_EFFECTS, PAGE)
    assert data[:PAGE] == page
    assert data[PAGE:] == bytes(length - PAGE)  # every byte of the buffer written


def test_get_log_page_length_over_mdts(host: Host) -> None:
    c, _ = host.get_log(LogPage.SMART_HEALTH, (512 << 10) + 4)
    assert c.status == with_dnr(Status.INVALID_FIELD)


def test_get_log_page_unaligned_offset(host: Host) -> None:
    c, _ = host.get_log(LogPage.SMART_HEALTH, 16, offset=2)
    assert c.status == with_dnr(Status.INVALID_FIELD)


@pytest.mark.parametrize(
    ("lid", "size"),
    [
        (LogPage.SMART_HEALTH, 512),
        (LogPage.FIRMWARE_SLOT, 512),
        (LogPage.SUPPORTED_LOG_PAGES, 1024),
    ],
)
def test_get_log_page_offset_past_end(host: Host, lid: int, size: int) -> None:
    c, _ = host.get_log(lid, 4, offset=size + 4)
    assert c.status == with_dnr(Status.INVALID_FIELD)
    c, _ = host.get_log(lid, 4, offset=1 << 40)  # LPOU
    assert c.status == with_dnr(Status.INVALID_FIELD)


@pytest.mark.parametrize("lid", [0x06, 0x07, 0x0D, 0x70, 0x80, 0xC0, 0xFF])
def test_get_log_page_unknown_log_page(host: Host, lid: int) -> None:
    c, _ = host.get_log(lid, 512)
    assert c.status == with_dnr(Status.INVALID_LOG_PAGE)


def test_get_log_page_unsupported_csi(host: Host) -> None:
    c, _ = host.get_log(LogPage.SMART_HEALTH, 512, csi=2)
    assert c.status == with_dnr(Status.INVALID_FIELD)


@pytest.mark.parametrize(
    "lid",
    [
        LogPage.SUPPORTED_LOG_PAGES,
        LogPage.ERROR_INFORMATION,
        LogPage.SMART_HEALTH,
        LogPage.FIRMWARE_SLOT,
        LogPage.CHANGED_NAMESPACE_LIST,
        LogPage.COMMANDS_SUPPORTED_AND_EFFECTS,
    ],
)
def test_get_log_page_controller_scope_logs_refuse_a_namespace_id(host: Host, lid: int) -> None:
    """Every log here has controller (or NVM subsystem) scope: an NSID other than 0h or
    FFFFFFFFh is Invalid Field in Command."""
    for nsid in (0, 0xFFFFFFFF):
        assert host.get_log(lid, 64, nsid=nsid)[0].status == 0
    for nsid in (1, 2, 0xFFFFFFFE):
        assert host.get_log(lid, 64, nsid=nsid)[0].status == with_dnr(Status.INVALID_FIELD)


def test_get_log_page_failed_read_keeps_changed_namespace_list(host: Host) -> None:
    """Without RAE the list is cleared 'after the command completes successfully' only."""
    host.ctrl.changed_namespaces.add(1)
    c = host.admin_cmd(
        [
            AdminOpcode.GET_LOG_PAGE,
            0xFFFFFFFF,
            0,
            0,
            0,
            0,
            host.scratch + 2,
            0,
            0,
            0,
            LogPage.CHANGED_NAMESPACE_LIST | (1023 << 16),
        ]
    )
    assert c.status == with_dnr(Status.PRP_OFFSET_INVALID)
    _, data = host.get_log(LogPage.CHANGED_NAMESPACE_LIST, PAGE)
    assert u32(data, 0) == 1
