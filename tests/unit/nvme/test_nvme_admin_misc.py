"""Admin command dispatch: opcodes, fused/SGL bits, completion entry fields
(NVMe Base 2.0: Submission Queue Entry, Completion Queue Entry)."""

from __future__ import annotations

import pytest
from harness import Host, with_dnr

from nvme_mdev.nvme.spec import AdminOpcode, Status


@pytest.mark.parametrize(
    "opcode",
    [
        0x03,
        AdminOpcode.NAMESPACE_MANAGEMENT,
        AdminOpcode.FIRMWARE_COMMIT,
        AdminOpcode.FIRMWARE_DOWNLOAD,
        AdminOpcode.DEVICE_SELF_TEST,
        AdminOpcode.NAMESPACE_ATTACHMENT,
        AdminOpcode.DIRECTIVE_SEND,
        AdminOpcode.VIRTUALIZATION_MANAGEMENT,
        AdminOpcode.NVME_MI_SEND,
        AdminOpcode.FORMAT_NVM,
        AdminOpcode.SECURITY_SEND,
        AdminOpcode.SANITIZE,
        0x7F,
        0xC0,
        0xFF,
    ],
)
def test_unknown_admin_opcode(host: Host, opcode: int) -> None:
    c = host.admin_cmd([opcode, 1])
    assert c.status == with_dnr(Status.INVALID_OPCODE)
    assert c.dw0 == 0


@pytest.mark.parametrize(
    ("flags", "what"),
    [(0x01, "fused first"), (0x02, "fused second"), (0x40, "PSDT SGL"), (0x80, "PSDT SGL/MPTR")],
)
def test_fused_or_sgl_admin_command(host: Host, flags: int, what: str) -> None:
    opcode = AdminOpcode.IDENTIFY | (flags << 8)
    c = host.admin_cmd([opcode, 0, 0, 0, 0, 0, host.scratch, 0, 0, 0, 1])
    assert c.status == with_dnr(Status.INVALID_FIELD), what


def test_completion_entry_fields(host: Host) -> None:
    for i in range(40):  # more than the 32-entry admin queue: SQHD and CID wrap with it
        c = host.admin_cmd([AdminOpcode.KEEP_ALIVE])
        assert c.status == 0
        assert c.sq_id == 0
        assert c.sq_head == (i + 1) % 32
        assert c.cid == i


def test_admin_errors_keep_the_queue_going(host: Host) -> None:
    assert host.admin_cmd([0xFF]).status == with_dnr(Status.INVALID_OPCODE)
    c, _ = host.identify(1)
    assert c.status == 0


def test_several_admin_commands_in_one_pass(host: Host) -> None:
    cids = [host.admin.submit([AdminOpcode.KEEP_ALIVE], ring=False) for _ in range(5)]
    host.admin.ring_sq()
    assert host.ctrl.process_admin() == 5
    assert [c.cid for c in host.admin.reap()] == cids
    assert host.interrupts.signalled == [0]  # one interrupt for the batch
