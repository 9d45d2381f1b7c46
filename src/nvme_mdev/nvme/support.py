"""What the controller supports, entry by entry: the table behind docs/support.md.

Levels and notes are written here by hand; a test probes the controller for every
opcode, CNS, log page and feature the specification's enums name, and fails when
this table says otherwise (or when docs/support.md is not `render()`'s output), so
the document cannot drift from the code. Regenerate it with

    python -m nvme_mdev.nvme.support > docs/support.md
"""

from __future__ import annotations

from typing import Literal

from .spec import AdminOpcode, Cns, FeatureId, IoOpcode, LogPage

Level = Literal["full", "partial", "refused"]
Table = dict[int, tuple[Level, str]]

_NOT_VIRTUAL = "a slice of host storage has no such thing to manage"

ADMIN: Table = {
    AdminOpcode.DELETE_IO_SQ: ("full", ""),
    AdminOpcode.CREATE_IO_SQ: (
        "partial",
        "physically contiguous queues only (CAP.CQR = 1); priority class accepted, "
        "round-robin arbitration only",
    ),
    AdminOpcode.GET_LOG_PAGE: ("full", "offsets, NUMDL/NUMDU, RAE; the log pages below"),
    AdminOpcode.DELETE_IO_CQ: ("full", "Invalid Queue Deletion while an SQ uses it"),
    AdminOpcode.CREATE_IO_CQ: (
        "partial",
        "physically contiguous queues only (CAP.CQR = 1); several SQs may share one CQ",
    ),
    AdminOpcode.IDENTIFY: ("full", "the CNS values below"),
    AdminOpcode.ABORT: (
        "full",
        "a command still in its SQ completes unrun with Command Abort Requested; one "
        "already fetched has run to completion ('not aborted'); ACL 4",
    ),
    AdminOpcode.SET_FEATURES: ("full", "the features below; none is saveable"),
    AdminOpcode.GET_FEATURES: ("full", "SEL current/default/saved/supported capabilities"),
    AdminOpcode.ASYNC_EVENT_REQUEST: (
        "full",
        "error, SMART/health and notice (namespace attribute changed) events, masked by "
        "Asynchronous Event Configuration",
    ),
    AdminOpcode.NAMESPACE_MANAGEMENT: ("refused", "namespaces are configured on the host"),
    AdminOpcode.FIRMWARE_COMMIT: ("refused", "the firmware is this program"),
    AdminOpcode.FIRMWARE_DOWNLOAD: ("refused", "the firmware is this program"),
    AdminOpcode.DEVICE_SELF_TEST: ("refused", _NOT_VIRTUAL),
    AdminOpcode.NAMESPACE_ATTACHMENT: ("refused", "namespaces are attached on the host"),
    AdminOpcode.KEEP_ALIVE: ("full", "accepted; no keep-alive timer (KAS = 0)"),
    AdminOpcode.DIRECTIVE_SEND: ("refused", "no directives (OACS bit 5 clear)"),
    AdminOpcode.DIRECTIVE_RECEIVE: ("refused", "no directives (OACS bit 5 clear)"),
    AdminOpcode.VIRTUALIZATION_MANAGEMENT: ("refused", _NOT_VIRTUAL),
    AdminOpcode.NVME_MI_SEND: ("refused", "no management interface"),
    AdminOpcode.NVME_MI_RECEIVE: ("refused", "no management interface"),
    AdminOpcode.DOORBELL_BUFFER_CONFIG: (
        "full",
        "shadow doorbells with EventIdx; refused (Invalid Opcode) with --mmap-doorbells",
    ),
    AdminOpcode.FORMAT_NVM: ("refused", "the LBA format is chosen on the host (bs=)"),
    AdminOpcode.SECURITY_SEND: ("refused", "no security protocols"),
    AdminOpcode.SECURITY_RECEIVE: ("refused", "no security protocols"),
    AdminOpcode.SANITIZE: ("refused", _NOT_VIRTUAL),
}

IO: Table = {
    IoOpcode.FLUSH: ("full", "flushes the backend (fdatasync); NSID FFFFFFFFh flushes all"),
    IoOpcode.WRITE: ("full", "PRPs or SGLs, FUA; zero-copy from guest memory"),
    IoOpcode.READ: ("full", "PRPs or SGLs (bit bucket too), FUA; zero-copy into guest memory"),
    IoOpcode.WRITE_UNCORRECTABLE: (
        "refused",
        "the marks would have to outlive the process; ONCS bit 1 clear",
    ),
    IoOpcode.COMPARE: ("full", "Compare Failure when the data differs"),
    IoOpcode.WRITE_ZEROES: ("full", "DEAC deallocates (punches a hole or discards)"),
    IoOpcode.DATASET_MANAGEMENT: ("full", "every attribute accepted; deallocate honoured"),
    IoOpcode.VERIFY: ("full", "reads and checks the range, moves no data"),
    IoOpcode.RESERVATION_REGISTER: ("refused", "no reservations (ONCS bit 5 clear)"),
    IoOpcode.RESERVATION_REPORT: ("refused", "no reservations (ONCS bit 5 clear)"),
    IoOpcode.RESERVATION_ACQUIRE: ("refused", "no reservations (ONCS bit 5 clear)"),
    IoOpcode.RESERVATION_RELEASE: ("refused", "no reservations (ONCS bit 5 clear)"),
    IoOpcode.COPY: ("partial", "source range format 0 only, within one namespace"),
}

IDENTIFY: Table = {
    Cns.NAMESPACE: ("full", ""),
    Cns.CONTROLLER: ("full", ""),
    Cns.ACTIVE_NAMESPACE_LIST: ("full", ""),
    Cns.NAMESPACE_ID_DESCRIPTORS: ("full", "EUI-64, NGUID, UUID, CSI"),
    Cns.NVM_SET_LIST: ("refused", "no NVM sets"),
    Cns.CS_NAMESPACE: ("full", "NVM command set"),
    Cns.CS_CONTROLLER: ("full", "NVM command set"),
    Cns.CS_ACTIVE_NAMESPACE_LIST: ("full", "NVM command set"),
    Cns.CS_INDEPENDENT_NAMESPACE: ("full", ""),
    Cns.ALLOCATED_NAMESPACE_LIST: ("refused", "no namespace management"),
    Cns.ALLOCATED_NAMESPACE: ("refused", "no namespace management"),
    Cns.NAMESPACE_ATTACHED_CONTROLLER_LIST: ("full", ""),
    Cns.CONTROLLER_LIST: ("full", ""),
    Cns.PRIMARY_CONTROLLER_CAPABILITIES: ("refused", "no virtualization management"),
    Cns.SECONDARY_CONTROLLER_LIST: ("refused", "no virtualization management"),
    Cns.NAMESPACE_GRANULARITY_LIST: ("refused", "no namespace management"),
    Cns.UUID_LIST: ("refused", "no UUID lists"),
    Cns.DOMAIN_LIST: ("refused", "no domains"),
    Cns.ENDURANCE_GROUP_LIST: ("refused", "no endurance groups"),
    Cns.CS_ALLOCATED_NAMESPACE_LIST: ("refused", "no namespace management"),
    Cns.CS_ALLOCATED_NAMESPACE: ("refused", "no namespace management"),
    Cns.IO_COMMAND_SET: ("full", "NVM command set only"),
}

LOG_PAGES: Table = {
    LogPage.SUPPORTED_LOG_PAGES: ("full", ""),
    LogPage.ERROR_INFORMATION: ("full", "a ring of the most recent errors"),
    LogPage.SMART_HEALTH: (
        "partial",
        "real I/O counters, power-on hours, unsafe shutdowns, media errors; critical "
        "warnings from the host's storage (reliability degraded: a namespace's storage "
        "is gone; read-only: it went read-only); the temperature is a constant; "
        "controller scope only (LPA bit 0 clear)",
    ),
    LogPage.FIRMWARE_SLOT: ("full", "one read-only slot"),
    LogPage.CHANGED_NAMESPACE_LIST: (
        "full",
        "namespaces attached, detached, resized (ns rescan) or write-protected by the "
        "host's storage; cleared on read unless RAE",
    ),
    LogPage.COMMANDS_SUPPORTED_AND_EFFECTS: ("full", ""),
    LogPage.DEVICE_SELF_TEST: ("refused", "no self-test"),
    LogPage.TELEMETRY_HOST: ("refused", "no telemetry"),
    LogPage.ENDURANCE_GROUP: ("refused", "no endurance groups"),
    LogPage.FEATURE_IDENTIFIERS_SUPPORTED: ("full", "every feature: controller scope"),
}

FEATURES: Table = {
    FeatureId.ARBITRATION: ("partial", "the burst is honoured (default 32); round robin only"),
    FeatureId.POWER_MANAGEMENT: ("full", "one power state"),
    FeatureId.LBA_RANGE_TYPE: ("refused", "optional, obsolete"),
    FeatureId.TEMPERATURE_THRESHOLD: ("full", "per sensor and over/under"),
    FeatureId.ERROR_RECOVERY: ("partial", "TLER stored; DULBE refused"),
    FeatureId.VOLATILE_WRITE_CACHE: (
        "full",
        "off: every write is made durable before it completes",
    ),
    FeatureId.NUMBER_OF_QUEUES: ("full", "once per controller reset"),
    FeatureId.INTERRUPT_COALESCING: ("full", "aggregation threshold and time, I/O queues only"),
    FeatureId.INTERRUPT_VECTOR_CONFIG: ("full", "coalescing disable per vector"),
    FeatureId.WRITE_ATOMICITY: ("full", ""),
    FeatureId.ASYNC_EVENT_CONFIG: ("full", "SMART warnings and namespace attribute notices"),
    FeatureId.AUTONOMOUS_POWER_STATE_TRANSITION: ("refused", "one power state"),
    FeatureId.HOST_MEMORY_BUFFER: ("refused", "needs no host memory"),
    FeatureId.TIMESTAMP: ("full", ""),
    FeatureId.KEEP_ALIVE_TIMER: ("refused", "no keep-alive timer"),
    FeatureId.HOST_CONTROLLED_THERMAL_MGMT: ("refused", "no thermal management"),
    FeatureId.NON_OPERATIONAL_POWER_STATE: ("refused", "one power state"),
    FeatureId.READ_RECOVERY_LEVEL: ("refused", "no NVM sets"),
    FeatureId.PREDICTABLE_LATENCY_CONFIG: ("refused", "no NVM sets"),
    FeatureId.PREDICTABLE_LATENCY_WINDOW: ("refused", "no NVM sets"),
    FeatureId.HOST_BEHAVIOR_SUPPORT: ("refused", "nothing the host could ask for"),
    FeatureId.SANITIZE_CONFIG: ("refused", "no sanitize"),
    FeatureId.ENDURANCE_GROUP_EVENT_CONFIG: ("refused", "no endurance groups"),
    FeatureId.IO_COMMAND_SET_PROFILE: ("refused", "NVM command set only"),
    FeatureId.SOFTWARE_PROGRESS_MARKER: ("refused", "optional"),
    FeatureId.HOST_IDENTIFIER: ("refused", "no reservations"),
    FeatureId.RESERVATION_NOTIFICATION_MASK: ("refused", "no reservations"),
    FeatureId.RESERVATION_PERSISTENCE: ("refused", "no reservations"),
    FeatureId.NAMESPACE_WRITE_PROTECTION: ("refused", "read-only is chosen on the host (ro)"),
}

SECTIONS: tuple[tuple[str, str, type, Table], ...] = (
    ("Admin commands", "opcode", AdminOpcode, ADMIN),
    ("I/O commands (NVM command set)", "opcode", IoOpcode, IO),
    ("Identify (CNS)", "CNS", Cns, IDENTIFY),
    ("Log pages", "LID", LogPage, LOG_PAGES),
    ("Features", "FID", FeatureId, FEATURES),
)


def render() -> str:
    lines = [
        "# What the virtual controller supports",
        "",
        "Generated by `python -m nvme_mdev.nvme.support` from `src/nvme_mdev/nvme/support.py`;",
        "`tests/unit/nvme/test_support_doc.py` probes the controller for every entry and fails",
        "if this document and the code disagree. *refused* means the controller answers",
        "Invalid Command Opcode (commands), Invalid Field in Command (CNS, features) or",
        "Invalid Log Page, and Identify does not advertise it.",
    ]
    for title, key, enum, table in SECTIONS:
        lines += [
            "",
            f"## {title}",
            "",
            f"| {key} | name | support | notes |",
            "| --- | --- | --- | --- |",
        ]
        for code in sorted(table):
            level, note = table[code]
            name = enum(code).name.replace("_", " ").lower()
            lines.append(f"| {code:02X}h | {name} | {level} | {note} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(render(), end="")
