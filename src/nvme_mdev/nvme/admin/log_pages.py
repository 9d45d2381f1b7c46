"""Get Log Page (NVMe Base 5.16) and the logs the controller keeps."""

from __future__ import annotations

import struct
from collections import deque
from typing import TYPE_CHECKING, Any

from ..errors import CommandError
from ..prp import send_to_host
from ..spec import AdminOpcode, IoOpcode, LogPage, Status
from .features import REPORTED_TEMPERATURE
from .features import SUPPORTED as SUPPORTED_FEATURES

if TYPE_CHECKING:
    from ..controller import Controller

ERROR_ENTRY = struct.Struct("<QHHHHQIBBHQQ")  # Base Figure 206, first 48 bytes of 64
ERROR_ENTRY_SIZE = 64

# Commands Supported and Effects: CSUPP (0), LBCC (1), NCC (2), NIC (3), CCC (4), CSE (18:16)
CSUPP, LBCC, NCC, NIC, CCC = 1, 1 << 1, 1 << 2, 1 << 3, 1 << 4
ADMIN_EFFECTS = {
    AdminOpcode.DELETE_IO_SQ: CSUPP,
    AdminOpcode.CREATE_IO_SQ: CSUPP,
    AdminOpcode.GET_LOG_PAGE: CSUPP,
    AdminOpcode.DELETE_IO_CQ: CSUPP,
    AdminOpcode.CREATE_IO_CQ: CSUPP,
    AdminOpcode.IDENTIFY: CSUPP,
    AdminOpcode.ABORT: CSUPP,
    AdminOpcode.SET_FEATURES: CSUPP,
    AdminOpcode.GET_FEATURES: CSUPP,
    AdminOpcode.ASYNC_EVENT_REQUEST: CSUPP,
    AdminOpcode.KEEP_ALIVE: CSUPP,
    AdminOpcode.DOORBELL_BUFFER_CONFIG: CSUPP,
}
# Write Uncorrectable is not supported, so its entry stays zero (see io.py).
IO_EFFECTS = {
    IoOpcode.FLUSH: CSUPP | LBCC,
    IoOpcode.WRITE: CSUPP | LBCC,
    IoOpcode.READ: CSUPP,
    IoOpcode.COMPARE: CSUPP,
    IoOpcode.WRITE_ZEROES: CSUPP | LBCC,
    IoOpcode.DATASET_MANAGEMENT: CSUPP | LBCC,
    IoOpcode.VERIFY: CSUPP,
    IoOpcode.COPY: CSUPP | LBCC,
}
# Feature Identifiers Supported and Effects: FSUPP (0), FSP (31:20), controller scope (21)
FEATURE_CONTROLLER_SCOPE = 1 << 21
SUPPORTED_LOGS = (
    LogPage.SUPPORTED_LOG_PAGES,
    LogPage.ERROR_INFORMATION,
    LogPage.SMART_HEALTH,
    LogPage.FIRMWARE_SLOT,
    LogPage.CHANGED_NAMESPACE_LIST,
    LogPage.COMMANDS_SUPPORTED_AND_EFFECTS,
    LogPage.FEATURE_IDENTIFIERS_SUPPORTED,
)


class ErrorLog:
    """Error Information log (Base 5.16.1.2): newest first, a count that never resets."""

    def __init__(self, entries: int) -> None:
        self.entries: deque[bytes] = deque(maxlen=entries)
        self.count = 0
        self.unread = 0

    def handover_state(self) -> dict[str, Any]:
        return {
            "entries": [e.hex() for e in self.entries],
            "count": self.count,
            "unread": self.unread,
        }

    def restore(self, state: dict[str, Any]) -> None:
        self.entries.clear()
        self.entries.extend(bytes.fromhex(e) for e in state["entries"])
        self.count = int(state["count"])
        self.unread = int(state["unread"])

    def record(self, sqid: int, cid: int, status: int, nsid: int, lba: int = 0) -> None:
        self.count += 1
        self.unread += 1
        entry = ERROR_ENTRY.pack(
            self.count, sqid, cid, status << 1, 0xFFFF, lba, nsid, 0, 0, 0, 0, 0
        )
        self.entries.appendleft(entry.ljust(ERROR_ENTRY_SIZE, b"\0"))

    def page(self) -> bytes:
        """The whole log: ELPE + 1 entries, those not yet used zero (error count 0h)."""
        self.unread = 0
        size = (self.entries.maxlen or 0) * ERROR_ENTRY_SIZE
        return b"".join(self.entries).ljust(size, b"\0")


def supported_log_pages() -> bytes:
    data = bytearray(1024)
    for lid in SUPPORTED_LOGS:
        struct.pack_into("<I", data, lid * 4, 1)  # LSUPP
    return bytes(data)


def smart_health(ctrl: Controller) -> bytes:
    data = bytearray(512)
    c = ctrl.counters
    data[0] = ctrl.critical_warning()
    struct.pack_into("<H", data, 1, REPORTED_TEMPERATURE)
    data[3] = 100  # available spare, %
    data[4] = 10  # available spare threshold
    data[5] = 0  # percentage used
    # Data units are thousands of 512-byte units, rounded up (Base Figure 207).
    units_read = (c.bytes_read // 512 + 999) // 1000
    units_written = (c.bytes_written // 512 + 999) // 1000
    for offset, value in (
        (32, units_read),
        (48, units_written),
        (64, c.host_read_commands),
        (80, c.host_write_commands),
        (96, 0),  # controller busy time
        (112, ctrl.power_cycles),
        (128, ctrl.uptime_hours()),
        (144, ctrl.unsafe_shutdowns),
        (160, c.media_errors),
        (176, ctrl.error_log.count),
    ):
        data[offset : offset + 16] = value.to_bytes(16, "little")
    return bytes(data)


def firmware_slot(ctrl: Controller) -> bytes:
    data = bytearray(512)
    data[0] = 1  # AFI: slot 1 active
    data[8:16] = ctrl.config.firmware.encode("ascii")[:8].ljust(8, b" ")
    return bytes(data)


def changed_namespaces(ctrl: Controller) -> tuple[bytes, list[int]]:
    """The log, and the NSIDs it reports (the I/O thread may add one meanwhile)."""
    with ctrl.events.lock:
        reported = sorted(ctrl.changed_namespaces)
    ids = [0xFFFFFFFF] if len(reported) > 1024 else reported  # more than the list holds
    return struct.pack(f"<{len(ids)}I", *ids).ljust(4096, b"\0"), reported


def commands_supported_and_effects() -> bytes:
    data = bytearray(4096)
    for admin_opcode, effects in ADMIN_EFFECTS.items():
        struct.pack_into("<I", data, admin_opcode * 4, effects)
    for io_opcode, effects in IO_EFFECTS.items():
        struct.pack_into("<I", data, 1024 + io_opcode * 4, effects)
    return bytes(data)


def feature_identifiers_supported_and_effects() -> bytes:
    """One dword per FID: supported, controller scope (Get Features SEL 3 agrees: none is
    namespace specific), and no effects on user data or capabilities."""
    data = bytearray(1024)
    for fid in SUPPORTED_FEATURES:
        struct.pack_into("<I", data, fid * 4, CSUPP | FEATURE_CONTROLLER_SCOPE)
    return bytes(data)


def get_log_page(ctrl: Controller, dw: tuple[int, ...]) -> int:
    lid = dw[10] & 0xFF
    retain_event = bool(dw[10] & (1 << 15))
    numd = ((dw[10] >> 16) | ((dw[11] & 0xFFFF) << 16)) + 1
    offset = dw[12] | (dw[13] << 32)
    csi = dw[14] >> 24
    length = numd * 4
    if length > ctrl.config.max_transfer:
        raise CommandError(Status.INVALID_FIELD, f"{length} bytes > MDTS")
    if offset & 0x3:
        raise CommandError(Status.INVALID_FIELD, "log page offset not dword aligned")
    if csi != 0:
        raise CommandError(Status.INVALID_FIELD, f"CSI {csi}")
    if lid not in SUPPORTED_LOGS:
        raise CommandError(Status.INVALID_LOG_PAGE, f"log page {lid:#x}")
    if dw[1] not in (0, 0xFFFFFFFF):
        # Every log here has controller or NVM subsystem scope (LPA bit 0 is clear: no
        # per-namespace SMART): another NSID is Invalid Field in Command (Get Log Page).
        raise CommandError(Status.INVALID_FIELD, f"log page {lid:#x} is not per namespace")
    reported: list[int] = []
    if lid == LogPage.SUPPORTED_LOG_PAGES:
        page = supported_log_pages()
    elif lid == LogPage.ERROR_INFORMATION:
        page = ctrl.error_log.page()
    elif lid == LogPage.SMART_HEALTH:
        page = smart_health(ctrl)
    elif lid == LogPage.FIRMWARE_SLOT:
        page = firmware_slot(ctrl)
    elif lid == LogPage.CHANGED_NAMESPACE_LIST:
        page, reported = changed_namespaces(ctrl)
    elif lid == LogPage.COMMANDS_SUPPORTED_AND_EFFECTS:
        page = commands_supported_and_effects()
    else:
        page = feature_identifiers_supported_and_effects()
    if offset > len(page):
        raise CommandError(Status.INVALID_FIELD, f"offset {offset} past the {len(page)}-byte log")
    data = page[offset : offset + length]
    send_to_host(ctrl.memory, dw, data.ljust(length, b"\0"))
    # Only a successful read without RAE clears what the log reported (RAE: 'after
    # the command completes successfully'): the event mask, the changed namespace list.
    if not retain_event:
        all_reported = True
        if lid == LogPage.CHANGED_NAMESPACE_LIST:
            with ctrl.events.lock:
                # Only what was reported: a change since then stays listed, and notified.
                ctrl.changed_namespaces.difference_update(reported)
                all_reported = not ctrl.changed_namespaces
        ctrl.events.log_page_read(lid, all_reported)
    return 0
